package attest

import (
	"bytes"
	"crypto/sha256"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
)

func extendAll(extends [][]byte) []byte {
	v := make([]byte, sha256.Size)
	for _, e := range extends {
		s := sha256.Sum256(append(v, e...))
		v = s[:]
	}
	return v
}

func TestIMALog(t *testing.T) {
	files := []attesttest.IMAFile{{Path: "boot_aggregate", Content: []byte("pcrs 0-9")},
		{Path: "/usr/bin/sshd", Content: []byte("sshd")}, {Path: "/etc/passwd", Content: []byte("root"), Violation: true}}
	log, extends := attesttest.IMALog(files)
	entries, err := ParseIMALog(log)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 3 || entries[1].Path != "/usr/bin/sshd" || entries[1].Algorithm != "sha256" || entries[0].Template != "ima-ng" {
		t.Fatalf("entries: %+v", entries)
	}
	if !entries[2].Violation || entries[1].Violation || !bytes.Equal(entries[2].Extend, bytes.Repeat([]byte{0xff}, 32)) {
		t.Fatalf("violation: %+v", entries[2])
	}
	if d := sha256.Sum256([]byte("sshd")); !bytes.Equal(entries[1].FileDigest, d[:]) {
		t.Fatal("file digest of sshd")
	}
	// The quote may come before the last measurements: a prefix replays.
	for n := range 4 {
		if got, err := ReplayIMA(entries, extendAll(extends[:n])); err != nil || got != n {
			t.Errorf("replay to the value after %d entries: %d %v", n, got, err)
		}
	}
	if _, err := ReplayIMA(entries, bytes.Repeat([]byte{1}, 32)); err == nil || !strings.Contains(err.Error(), "does not replay") {
		t.Fatalf("replay to a foreign value: %v", err)
	}

	for name, bad := range map[string][]byte{
		"truncated":     log[:len(log)-3],
		"other PCR":     append([]byte{9, 0, 0, 0}, log[4:]...),
		"legacy 'ima'":  legacy(),
		"no d-ng field": append(append([]byte{10, 0, 0, 0}, make([]byte, 20)...), 6, 0, 0, 0, 'i', 'm', 'a', '-', 'n', 'g', 0, 0, 0, 0),
	} {
		if _, err := ParseIMALog(bad); err == nil {
			t.Errorf("%s: parsed", name)
		}
	}
}

func legacy() []byte {
	b := append([]byte{10, 0, 0, 0}, make([]byte, 20)...)
	b = append(b, 3, 0, 0, 0, 'i', 'm', 'a')
	return append(b, 0, 0, 0, 0)
}

// A digest policy allows any of several known-good measurements: here
// two kernels, and the files IMA measured on a known-good machine.
func TestDigestPolicy(t *testing.T) {
	kernel := func(k string) Boot {
		log, pcrs := attesttest.EventLog([]attesttest.Measurement{{PCR: 4, Type: 0x80000003, Data: []byte(k)}})
		events, err := ParseEventLog(log)
		if err != nil {
			t.Fatal(err)
		}
		return Boot{PCRs: pcrs, Events: events}
	}
	a, b := LearnDigests(kernel("kernel A"), []int{4}), LearnDigests(kernel("kernel B"), []int{4})
	p := Policy{Digests: map[int][][]byte{4: append(a.Digests[4], b.Digests[4]...)}}
	for _, k := range []string{"kernel A", "kernel B"} {
		if m := Evaluate(p, kernel(k)); len(m) != 0 {
			t.Errorf("%s: %v", k, m)
		}
	}
	m := Evaluate(p, kernel("kernel C"))
	if len(m) != 1 || m[0].String() != "PCR 4: event #1 (EV_EFI_BOOT_SERVICES_APPLICATION) has a digest the policy does not allow" {
		t.Fatalf("kernel C: %v", m)
	}
	if m := Evaluate(p, Boot{PCRs: map[int][]byte{4: make([]byte, 32)}}); len(m) != 1 || m[0].String() != "PCR 4: nothing was measured" {
		t.Fatalf("no events: %v", m)
	}
	// Only the quote vouches for events: a PCR it leaves out, or whose
	// events do not replay to it (a log cut short), is judged on nothing.
	notQuoted := kernel("kernel A")
	delete(notQuoted.PCRs, 4)
	if m := Evaluate(p, notQuoted); len(m) != 1 || m[0].Kind != NotQuoted || m[0].PCR != 4 {
		t.Fatalf("PCR 4 not quoted: %v", m)
	}
	cut := kernel("kernel C")
	cut.Events = kernel("kernel A").Events
	if m := Evaluate(p, cut); len(m) != 1 || m[0].Kind != NotReplayed || m[0].String() != "PCR 4: the event log does not replay to the quoted value" {
		t.Fatalf("events that do not replay: %v", m)
	}
	if got := LearnDigests(notQuoted, []int{4}); len(got.Digests) != 0 {
		t.Fatalf("learned from a PCR the quote left out: %v", got.Digests)
	}

	ima := func(files ...attesttest.IMAFile) Boot {
		log, _ := attesttest.IMALog(files)
		entries, err := ParseIMALog(log)
		if err != nil {
			t.Fatal(err)
		}
		return Boot{IMA: entries, PCRs: map[int][]byte{IMAPCR: replayIMA(entries)}}
	}
	good := []attesttest.IMAFile{{Path: "boot_aggregate", Content: []byte("agg")}, {Path: "/usr/bin/sshd", Content: []byte("sshd")}}
	p = LearnDigests(ima(good...), []int{IMAPCR})
	if m := Evaluate(p, ima(good[1], good[0], good[1])); len(m) != 0 {
		t.Fatalf("the same files again: %v", m)
	}
	m = Evaluate(p, ima(append(good, attesttest.IMAFile{Path: "/tmp/x", Content: []byte("x")}, attesttest.IMAFile{Path: "/tmp/y", Content: []byte("y")})...))
	if len(m) != 1 || !strings.HasPrefix(m[0].String(), "PCR 10: /tmp/x (sha256:") || !strings.HasSuffix(m[0].String(), "does not allow, and 1 more") {
		t.Fatalf("unknown files: %v", m)
	}
	if e := m[0].IMA; e == nil || e.Index != 2 || e.Path != "/tmp/x" || m[0].Disallowed != 2 {
		t.Fatalf("unknown files: the first one not allowed is %+v, of %d", e, m[0].Disallowed)
	}
	short := ima(good...)
	short.PCRs = ima(append(good, attesttest.IMAFile{Path: "/tmp/x", Content: []byte("x")})...).PCRs
	if m := Evaluate(p, short); len(m) != 1 || m[0].Kind != NotReplayed || m[0].String() != "PCR 10: the IMA log does not replay to the quoted value" {
		t.Fatalf("an IMA log cut short: %v", m)
	}
	m = Evaluate(p, ima(good[0], attesttest.IMAFile{Path: "/usr/bin/sshd", Content: []byte("sshd"), Violation: true}))
	if len(m) != 1 || !strings.Contains(m[0].String(), "/usr/bin/sshd") || !strings.Contains(m[0].String(), "measurement violation") {
		t.Fatalf("violation: %v", m)
	}
	if e := m[0].IMA; e == nil || !e.Violation || e.Path != "/usr/bin/sshd" || m[0].Disallowed != 1 {
		t.Fatalf("violation: the entry not allowed is %+v", e)
	}
}

// The verifier accepts an IMA log only as far as the quoted PCR 10 vouches
// for it, in a real TPM extended as the kernel does.
func TestVerifyIMA(t *testing.T) {
	tpm, _ := guestTPM(t)
	akHandle, akPublic := createKey(t, tpm, RSAAKTemplate)
	ak, err := ParseAK(akPublic)
	if err != nil {
		t.Fatal(err)
	}
	imaLog, extends := attesttest.IMALog([]attesttest.IMAFile{{Path: "boot_aggregate", Content: []byte("agg")}, {Path: "/sbin/init", Content: []byte("init")}})
	for _, e := range extends[:1] { // the second is measured after the quote
		if _, err := (tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: IMAPCR, Auth: tpm2.PasswordAuth(nil)},
			Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: e}}}}).Execute(tpm); err != nil {
			t.Fatal(err)
		}
	}
	fwLog, _ := attesttest.EventLog(nil)
	nonce := bytes.Repeat([]byte{7}, 32)
	attest, sig, values := quote(t, tpm, akHandle, nonce, []uint{0, IMAPCR})
	ev := Evidence{Attest: attest, Signature: sig, PCRs: values, EventLog: fwLog, IMALog: imaLog}
	v, st := Verify(ak, ev, nonce, State{}, nil)
	if !v.Genuine || len(st.IMA) != 1 || st.IMA[0].Path != "boot_aggregate" {
		t.Fatalf("IMA log one entry ahead of the quote: %+v, %d entries judged", v, len(st.IMA))
	}
	other, _ := attesttest.IMALog([]attesttest.IMAFile{{Path: "boot_aggregate", Content: []byte("forged")}})
	ev.IMALog = other
	if v, _ := Verify(ak, ev, nonce, State{}, nil); v.Genuine || !strings.Contains(v.Reasons[0], "does not replay to the quoted PCR 10") {
		t.Fatalf("a forged IMA log: %+v", v)
	}
	attest, sig, values = quote(t, tpm, akHandle, nonce, []uint{0})
	ev = Evidence{Attest: attest, Signature: sig, PCRs: values, EventLog: fwLog, IMALog: imaLog}
	if v, _ := Verify(ak, ev, nonce, State{}, nil); v.Genuine || !strings.Contains(v.Reasons[0], "without a quote of PCR 10") {
		t.Fatalf("an IMA log without PCR 10 quoted: %+v", v)
	}
}

// A continuation of the IMA log replays from the value the entries the
// verifier holds replayed to, in the same boot only; the verifier judges
// the whole log.
func TestVerifyIMAContinuation(t *testing.T) {
	tpm, _ := guestTPM(t)
	akHandle, akPublic := createKey(t, tpm, RSAAKTemplate)
	ak, err := ParseAK(akPublic)
	if err != nil {
		t.Fatal(err)
	}
	files := []attesttest.IMAFile{{Path: "boot_aggregate", Content: []byte("agg")}, {Path: "/sbin/init", Content: []byte("init")},
		{Path: "/usr/sbin/sshd", Content: []byte("sshd")}, {Path: "/tmp/x", Content: []byte("x")}}
	whole, extends := attesttest.IMALog(files)
	extend := func(es [][]byte) {
		for _, e := range es {
			if _, err := (tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: IMAPCR, Auth: tpm2.PasswordAuth(nil)},
				Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: e}}}}).Execute(tpm); err != nil {
				t.Fatal(err)
			}
		}
	}
	fwLog, _ := attesttest.EventLog(nil)
	evidence := func(nonce []byte, ima []byte, offset int) Evidence {
		attest, sig, values := quote(t, tpm, akHandle, nonce, []uint{0, IMAPCR})
		return Evidence{Attest: attest, Signature: sig, PCRs: values, EventLog: fwLog, IMALog: ima, IMAOffset: offset}
	}
	p := Policy{Digests: map[int][][]byte{}} // the first three files
	for _, f := range files[:3] {
		d := sha256.Sum256(f.Content)
		p.Digests[IMAPCR] = append(p.Digests[IMAPCR], d[:])
	}

	extend(extends[:2])
	first, _ := attesttest.IMALog(files[:2])
	nonce := bytes.Repeat([]byte{1}, 32)
	v, st := Verify(ak, evidence(nonce, first, 0), nonce, State{}, &p)
	if !v.Trusted || len(st.IMA) != 2 || !bytes.Equal(st.IMALog, first) {
		t.Fatalf("the first two entries: %+v, %d kept", v, len(st.IMA))
	}
	extend(extends[2:3])
	third, _ := attesttest.IMALog(files[2:3])
	time.Sleep(5 * time.Millisecond) // the TPM's clock must move on
	ev := evidence(nonce, third, 2)
	v, next := Verify(ak, ev, nonce, st, &p)
	if !v.Trusted || len(next.IMA) != 3 || next.IMA[2].Index != 2 || !bytes.Equal(next.IMALog, whole[:len(first)+len(third)]) {
		t.Fatalf("the third entry as a continuation: %+v, %d kept", v, len(next.IMA))
	}
	for name, c := range map[string]struct {
		prev   State
		offset int
		reason string
	}{
		"from an entry not held": {st, 1, "it continues from entry 1, the verifier holds 2 entries"},
		"nothing held":           {State{}, 2, "it continues from entry 2, the verifier holds 0 entries"},
		"across a reset": {State{Quote: &Quote{ResetCount: st.Quote.ResetCount - 1, PCRs: st.Quote.PCRs}, IMA: st.IMA, IMALog: st.IMALog}, 2,
			"it continues the log of a boot before the TPM's last reset"},
	} {
		ev := ev
		ev.IMAOffset = c.offset
		if v, _ := Verify(ak, ev, nonce, c.prev, &p); v.Genuine || !strings.HasSuffix(v.Reasons[0], c.reason) {
			t.Errorf("%s: %+v", name, v)
		}
	}
	// A file the policy does not allow, then one it does: the verifier
	// judges the whole log, so the first stays a reason.
	extend(extends[3:])
	rest, _ := attesttest.IMALog(files[3:])
	time.Sleep(5 * time.Millisecond)
	v, next = Verify(ak, evidence(nonce, rest, 3), nonce, next, &p)
	if v.Trusted || len(v.Mismatches) != 1 || v.Mismatches[0].Kind != DigestNotAllowed || !strings.HasPrefix(v.Reasons[0], "PCR 10: /tmp/x") {
		t.Fatalf("a disallowed file in a continuation: %+v", v)
	}
	time.Sleep(5 * time.Millisecond)
	if v, _ = Verify(ak, evidence(nonce, nil, 4), nonce, next, &p); v.Trusted || !strings.HasPrefix(v.Reasons[0], "PCR 10: /tmp/x") {
		t.Fatalf("an empty continuation after it: %+v", v)
	}
}
