package attest

import (
	"os"
	"testing"
)

// Descriptions of the events of a real OVMF boot, and of a boot loader's
// string, which is shown as it is (escaping is the caller's).
func TestEventDescription(t *testing.T) {
	log, err := os.ReadFile("testdata/ovmf-q35-eventlog.bin")
	if err != nil {
		t.Fatal(err)
	}
	evs, err := ParseEventLog(log)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range map[int]string{
		4:  "variable SecureBoot (8be4df61-93ca-11d2-aa0d-00e098032b8c)",
		10: "boot path kernel",
		12: "variable Boot0000 (8be4df61-93ca-11d2-aa0d-00e098032b8c)",
		13: "Calling EFI Application from Boot Option",
		14: "separator",
		2:  "16 bytes",
	} {
		if got := evs[i].Description(); got != want {
			t.Errorf("event #%d (%s): %q, want %q", i, evs[i].TypeName(), got, want)
		}
	}
	cmdline := Event{Type: 0x0d, Data: []byte("kernel_cmdline: quiet <script>alert(1)</script>\x00")}
	if got := cmdline.Description(); got != "kernel_cmdline: quiet <script>alert(1)</script>" {
		t.Errorf("a kernel command line: %q", got)
	}
}

// FirstDifference finds the event that differs, one missing, one more.
func TestFirstDifference(t *testing.T) {
	a := Event{Index: 1, PCR: 4, Type: 0x0d, Digest: []byte{1}}
	b := Event{Index: 2, PCR: 4, Type: 0x0d, Digest: []byte{2}}
	other := Event{Index: 3, PCR: 5, Type: 0x0d, Digest: []byte{9}}
	if _, ok := FirstDifference([]Event{a, other}, []Event{a}, 4); ok {
		t.Error("PCR 4 differs where only PCR 5 does")
	}
	if d, ok := FirstDifference([]Event{a}, []Event{b}, 4); !ok || d.Ref.Index != 1 || d.Got.Index != 2 {
		t.Errorf("another digest: %+v %v", d, ok)
	}
	if d, ok := FirstDifference([]Event{a, b}, []Event{a}, 4); !ok || d.Got != nil || d.Ref.Index != 2 || d.String() != "the reference boot's event #2 (EV_IPL) is missing" {
		t.Errorf("one missing: %+v %v", d, ok)
	}
}
