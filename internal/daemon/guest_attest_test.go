package daemon

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/uuid"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
)

// TestGuestAttestation boots a real UEFI guest with a vTPM from vtpmd whose
// /init runs the guest agent over QEMU user networking: registered and
// pending at first boot; trusted after the policy is learned from it and
// the guest boots the same way again; untrusted, naming PCR 9, when it
// boots with another kernel command line.
func TestGuestAttestation(t *testing.T) {
	lv := connectLibvirt(t)
	dir := t.TempDir()
	addr := freeAddr(t)
	_, port, _ := strings.Cut(addr, ":")
	u := startConfigured(t, Config{DataDir: dir, Listen: addr, HostName: "lv-host", Backend: "libvirt",
		Libvirt: LibvirtConfig{Mode: "emulator", EnableVTPM: true}})
	ctx := context.Background()
	id := uuid.NewString()
	console := filepath.Join(dir, "console.log")
	dom := defineGuestWith(t, lv, id, dir, guestOptions{init: attestInit, network: true,
		cmdline: "vtpmd.server=http://10.0.2.2:" + port})
	if _, err := u.c.Create(ctx, api.CreateVTPMRequest{InstanceID: id, Project: "p1",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}}}); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "active")

	boot := func(want string) api.Attestation {
		t.Helper()
		out := waitConsole(t, console, "VTPM-GUEST ")
		if !strings.Contains(out, "VTPM-GUEST VERDICT "+want) {
			t.Fatalf("guest console, want verdict %s:\n%s", want, out)
		}
		a, err := u.c.Attestation(ctx, client.Instance(id))
		if err != nil || a.Verdict != want {
			t.Fatalf("attestation: %+v %v", a, err)
		}
		t.Logf("        verdict: %s %s", a.Verdict, strings.Join(a.Reasons, "; "))
		return a
	}
	restart := func(edit func(*libvirtxml.Domain)) {
		t.Helper()
		if _, err := u.c.Stop(ctx, id); err != nil {
			t.Fatal(err)
		}
		u.wait(t, id, "stopped")
		if edit != nil {
			d := definition(t, lv, dom)
			edit(d)
			xml, _ := d.Marshal()
			if _, err := lv.DomainDefineXML(xml); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := u.c.Start(ctx, id); err != nil {
			t.Fatal(err)
		}
		u.wait(t, id, "active")
	}

	t.Logf("step 1: vTPM %s made and certified; attaching it to guest %s and booting (TCG, ≈20 s)", id, dom.Name)
	// First boot: registered, no policy yet.
	if _, err := u.c.Attach(ctx, id, dom.Name); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "active")
	boot("pending")
	t.Log("step 2: the guest agent registered (credential activation) and attested; learning this boot as the policy")
	if a, err := u.c.SetPolicy(ctx, client.Instance(id), api.PolicyRequest{Learn: true}); err != nil || a.Verdict != "trusted" {
		t.Fatalf("learning from the first boot: %+v %v", a, err)
	}

	// The same boot again: trusted.
	t.Log("step 3: stopping the guest and booting it the same way again")
	restart(nil)
	boot("trusted")

	// Another kernel command line: PCR 9 (the EFI stub measures it) differs.
	t.Log("step 4: booting with another kernel command line (\"quiet\" added)")
	restart(func(d *libvirtxml.Domain) { d.OS.Cmdline += " quiet" })
	a := boot("untrusted")
	if len(a.Reasons) == 0 || !strings.Contains(a.Reasons[0], "PCR 9") {
		t.Fatalf("untrusted for %v; want PCR 9 named", a.Reasons)
	}
}
