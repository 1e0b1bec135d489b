package attest

import (
	"bytes"
	"encoding/hex"
	"os"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
)

// The fixture is the event log OVMF wrote into a vtpmd vTPM while booting
// the Debian kernel under QEMU (TestLibvirt saves it with
// VTPMD_SAVE_EVENTLOG); these are the PCRs that guest read from its TPM.
var fixturePCRs = map[int]string{
	0: "ce729d0e02d46cecb9baa54228e55d1be49de54981fe6485a59bf9b222bcc061",
	1: "8e9d1fe23131f12d6a523e9c32eb3223d4dc25e14eb5fd60163e7ba8de0f248c",
	2: "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969",
	3: "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969",
	4: "57c2f1928d94a791c3bfd56665574ad3c3253dce5f7711cd4ae71431be8281ca",
	5: "a5ceb755d043f32431d63e39f5161464620a3437280494b5850dc1b47cc074e0",
	6: "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969",
	7: "65caf8dd1e0ea7a6347b635d2b379c93b9a1351edc2afc3ecda700e534eb3068",
}

func fixture(t testing.TB) ([]byte, []Event) {
	t.Helper()
	log, err := os.ReadFile("testdata/ovmf-q35-eventlog.bin")
	if err != nil {
		t.Fatal(err)
	}
	events, err := ParseEventLog(log)
	if err != nil {
		t.Fatal(err)
	}
	return log, events
}

func fixtureValues(t testing.TB) map[int][]byte {
	out := map[int][]byte{}
	for i, h := range fixturePCRs {
		out[i], _ = hex.DecodeString(h)
	}
	return out
}

func TestReplayRealLog(t *testing.T) {
	_, events := fixture(t)
	got := Replay(events)
	for i, want := range fixturePCRs {
		if hex.EncodeToString(got[i]) != want {
			t.Fatalf("PCR %d replays to %x, the TPM had %s", i, got[i], want)
		}
	}
	var types []string
	for _, e := range events {
		types = append(types, e.TypeName())
	}
	if !strings.Contains(strings.Join(types, ","), "EV_SEPARATOR") {
		t.Fatalf("no separators among %v", types)
	}
}

func TestParseEventLogRefusesDamage(t *testing.T) {
	log, _ := fixture(t)
	for name, bad := range map[string][]byte{
		"empty":       nil,
		"truncated":   log[:len(log)-3],
		"header only": log[:20],
		"not agile":   append([]byte{0, 0, 0, 0, 9, 0, 0, 0}, log[8:]...),
		"huge event":  append(bytes.Clone(log), 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f),
	} {
		if _, err := ParseEventLog(bad); err == nil {
			t.Fatalf("%s: accepted", name)
		}
	}
}

func FuzzParseEventLog(f *testing.F) {
	log, _ := fixture(f)
	f.Add(log)
	f.Fuzz(func(t *testing.T, b []byte) {
		if events, err := ParseEventLog(b); err == nil {
			Replay(events)
		}
	})
}

func TestPolicy(t *testing.T) {
	log, events := fixture(t)
	pcrs := fixtureValues(t)
	p := Learn(Boot{PCRs: pcrs}, log, []int{0, 1, 2, 3, 4, 5, 6, 7})
	if m := Evaluate(p, Boot{PCRs: pcrs, Events: events}); len(m) != 0 {
		t.Fatalf("the learned boot itself: %v", m)
	}

	// Another kernel: the event that measured it changes, and PCR 4 with it.
	other := make([]Event, len(events))
	copy(other, events)
	changed := -1
	for i, e := range other {
		if e.PCR == 4 && e.Type == 0x80000003 { // EV_EFI_BOOT_SERVICES_APPLICATION
			other[i].Digest = bytes.Repeat([]byte{0xab}, 32)
			changed = e.Index
			break
		}
	}
	if changed < 0 {
		t.Fatal("the fixture measures no boot application into PCR 4")
	}
	m := Evaluate(p, Boot{PCRs: Replay(other), Events: other})
	if len(m) != 1 || m[0].PCR != 4 || !strings.Contains(m[0].String(), "EV_EFI_BOOT_SERVICES_APPLICATION") {
		t.Fatalf("mismatches: %v", m)
	}
	// A PCR left out of the quote is a mismatch too.
	delete(pcrs, 7)
	if m := Evaluate(p, Boot{PCRs: pcrs}); len(m) != 1 || m[0].PCR != 7 || m[0].Kind != NotQuoted {
		t.Fatalf("missing PCR 7: %v", m)
	}
}

// The test event-log builder writes what the parser reads and replays.
func TestMadeUpEventLog(t *testing.T) {
	log, pcrs := attesttest.EventLog([]attesttest.Measurement{
		{PCR: 0, Type: 0x80000008, Data: []byte("host firmware")},
		{PCR: 4, Type: 0x80000003, Data: []byte("host kernel")},
		{PCR: 4, Type: 0x80000003, Data: []byte("host initrd")},
	})
	events, err := ParseEventLog(log)
	if err != nil {
		t.Fatal(err)
	}
	if len(events) != 4 || events[2].PCR != 4 || string(events[2].Data) != "host kernel" {
		t.Fatalf("events %+v", events)
	}
	replayed := Replay(events)
	if len(replayed) != 2 || !bytes.Equal(replayed[0], pcrs[0]) || !bytes.Equal(replayed[4], pcrs[4]) {
		t.Fatalf("replayed %x, want %x", replayed, pcrs)
	}
}
