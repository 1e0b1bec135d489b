package libvirt

import (
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/internal/spec"
)

// TestRetargetTPM: the destination XML of a live migration in external
// mode points the guest's TPM at the target's swtpm and keeps the rest of
// the device as QEMU runs it (its alias and address must match the
// source's for the device state to load); a guest without an external TPM
// is refused.
func TestRetargetTPM(t *testing.T) {
	dev := TPMDevice(spec.Spec{Version: spec.V20, Model: spec.CRB}, External, "", testSocket)
	dev.Alias = &libvirtxml.DomainAlias{Name: "tpm0"}
	d := libvirtxml.Domain{Type: "qemu", Name: "g", Devices: &libvirtxml.DomainDeviceList{TPMs: []libvirtxml.DomainTPM{*dev}}}
	xml, err := d.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	out, err := retargetTPM(xml, "/run/vtpmd/other.sock.ctrl")
	if err != nil {
		t.Fatal(err)
	}
	var got libvirtxml.Domain
	if err := got.Unmarshal(out); err != nil {
		t.Fatal(err)
	}
	tpm := got.Devices.TPMs[0]
	if p := tpm.Backend.External.Source.UNIX.Path; p != "/run/vtpmd/other.sock.ctrl" {
		t.Fatalf("the TPM's socket is %s", p)
	}
	if tpm.Alias == nil || tpm.Alias.Name != "tpm0" || tpm.Model != string(spec.CRB) {
		t.Fatalf("the rest of the device changed: %s", out)
	}
	if strings.Contains(out, testSocket) {
		t.Fatalf("the source's socket is still named: %s", out)
	}

	emulator := d
	emulator.Devices = &libvirtxml.DomainDeviceList{TPMs: []libvirtxml.DomainTPM{*TPMDevice(spec.Spec{Version: spec.V20}, Emulator, testSecret, "")}}
	xml, err = emulator.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := retargetTPM(xml, "/x"); err == nil {
		t.Fatal("retargeted an emulator TPM")
	}
}
