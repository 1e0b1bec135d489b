package daemon

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"testing"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/uuid"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/backend/libvirt"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// defineBareGuest defines a guest that boots nothing (q35, SeaBIOS, no
// disk: it runs, looking for a boot device, until destroyed) with UUID id,
// and, when secretID is set, the vTPM Nova gives a guest: libvirt's
// emulator TPM 2.0, tpm-crb, its state encrypted with the libvirt secret
// secretID. It is undefined, with its TPM state, when the test ends.
func defineBareGuest(t testing.TB, lv *golibvirt.Libvirt, id, name, secretID string) golibvirt.Domain {
	t.Helper()
	d := libvirtxml.Domain{
		Type: guestDomainType, Name: name, UUID: id,
		Memory:   &libvirtxml.DomainMemory{Value: 64, Unit: "MiB"},
		VCPU:     &libvirtxml.DomainVCPU{Value: 1},
		OS:       &libvirtxml.DomainOS{Type: &libvirtxml.DomainOSType{Arch: "x86_64", Machine: "q35", Type: "hvm"}},
		Features: &libvirtxml.DomainFeatureList{ACPI: &libvirtxml.DomainFeature{}},
		Devices:  &libvirtxml.DomainDeviceList{Emulator: "/usr/bin/qemu-system-x86_64"},
	}
	if secretID != "" {
		d.Devices.TPMs = []libvirtxml.DomainTPM{*libvirt.TPMDevice(spec.Spec{Version: spec.V20, Model: spec.CRB}, libvirt.Emulator, secretID, "")}
	}
	xml, err := d.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	dom, err := lv.DomainDefineXML(xml)
	if err != nil {
		t.Fatalf("defining guest %s: %v", name, err)
	}
	t.Cleanup(func() {
		lv.DomainDestroy(dom)
		lv.DomainUndefine(dom)
		os.RemoveAll(filepath.Join("/var/lib/libvirt/swtpm", id))
	})
	return dom
}

// novaStart starts dom as Nova does with secret security user: the vTPM's
// passphrase goes into an ephemeral, private libvirt secret of usage type
// vtpm under the key-manager secret's UUID, libvirt runs swtpm_setup at
// this first start and swtpm with the passphrase, and the libvirt secret
// is undefined once the guest runs. Then the guest is shut off, and its
// swtpm gone.
func novaStart(t *testing.T, lv *golibvirt.Libvirt, dom golibvirt.Domain, id, secretID string, passphrase []byte) {
	t.Helper()
	xml, err := libvirt.SecretXML(secretID, true, true, id)
	if err != nil {
		t.Fatal(err)
	}
	s, err := lv.SecretDefineXML(xml, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := lv.SecretSetValue(s, passphrase, 0); err != nil {
		t.Fatal(err)
	}
	if err := lv.DomainCreate(dom); err != nil {
		t.Fatalf("starting the guest as Nova does: %v", err)
	}
	if err := lv.SecretUndefine(s); err != nil {
		t.Fatal(err)
	}
	if err := lv.DomainDestroy(dom); err != nil {
		t.Fatal(err)
	}
	waitNoProcesses(t, filepath.Join("/var/lib/libvirt/swtpm", id))
}

// onState runs fn on the TPM whose state is in dir, served by a swtpm of
// the test's own that gets passphrase on a pipe, as libvirt's does.
func onState(t *testing.T, dir string, passphrase []byte, fn func(transport.TPM)) {
	t.Helper()
	i := swtpm.Instance{Dir: dir, Version: spec.V20, Secret: passphrase}
	p, err := swtpm.Start(context.Background(), i, nil)
	if err != nil {
		t.Fatalf("opening the state in %s: %v", dir, err)
	}
	defer p.Stop(context.Background())
	withTPM(t, i.DataSocket(), fn)
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestLibvirtAdopt makes a vTPM the way Nova does (a passphrase secret in
// the key manager, a libvirt domain with the emulator TPM keyed by it,
// libvirt's swtpm_setup at its first start), writes an NV index into that
// TPM, and has vtpmd take it over: the state is not rewritten, the EK
// vtpmd records is the TPM's, vtpmd starts the guest with it (NV data
// still there), stops it, and deletes it (state, libvirt secret and
// key-manager secret gone). Each refusal leaves no record; asking again
// returns the same vTPM.
func TestLibvirtAdopt(t *testing.T) {
	lv := connectLibvirt(t)
	dir := t.TempDir()
	u := startLibvirtDaemon(t, dir, "emulator")
	ctx := context.Background()
	kr := openKeyring(t, dir)

	// Nova's vTPM: its secret in the key manager, its guest started once.
	novaSecret := func(project, instance string) (string, []byte) {
		t.Helper()
		payload, err := keyring.NewVTPMSecret()
		if err != nil {
			t.Fatal(err)
		}
		id, err := kr.Create(ctx, project, keyring.VTPMSecretName(instance), payload)
		if err != nil {
			t.Fatal(err)
		}
		return id, payload
	}
	id := uuid.NewString()
	sid, passphrase := novaSecret("nova-project", id)
	dom := defineBareGuest(t, lv, id, "instance-"+id[:8], sid)
	novaStart(t, lv, dom, id, sid, passphrase)
	state := filepath.Join("/var/lib/libvirt/swtpm", id, "tpm2")
	data := []byte("the guest's own NV data, written while Nova ran it")
	var ekDER []byte
	onState(t, state, passphrase, func(tpm transport.TPM) { nvWrite(t, tpm, data) })
	ekDER = rsaEK(t, state, passphrase)
	permall := filepath.Join(state, "tpm2-00.permall")
	before := fileSum(t, permall)

	refused := func(instance string, req api.AdoptRequest, status int, code api.Code) {
		t.Helper()
		_, err := u.c.Adopt(ctx, instance, req)
		var e *client.Error
		if !errors.As(err, &e) || e.Status != status || e.Code != code {
			t.Fatalf("adopting %s %+v: %v, want %d %s", instance, req, err, status, code)
		}
		if _, err := u.c.Get(ctx, instance); code != api.CodeAlreadyManaged && !client.IsNotFound(err) {
			t.Fatalf("a refused adoption left a record of %s: %v", instance, err)
		}
	}
	refused(id, api.AdoptRequest{Domain: "no-such-domain"}, 404, api.CodeDomainNotFound)

	bare := uuid.NewString()
	defineBareGuest(t, lv, bare, "instance-"+bare[:8], "")
	refused(bare, api.AdoptRequest{Domain: "instance-" + bare[:8]}, 409, api.CodeNoVTPM)
	refused(id, api.AdoptRequest{Domain: "instance-" + bare[:8]}, 409, api.CodeNoVTPM) // its UUID is not the instance's

	// A guest Nova defined but never started has no state yet; once its
	// secret is gone from the key manager, that is what is refused.
	unstarted := uuid.NewString()
	usid, _ := novaSecret("nova-project", unstarted)
	defineBareGuest(t, lv, unstarted, "instance-"+unstarted[:8], usid)
	refused(unstarted, api.AdoptRequest{Domain: "instance-" + unstarted[:8]}, 409, api.CodeVTPMStateNotFound)
	if err := kr.Delete(ctx, usid); err != nil {
		t.Fatal(err)
	}
	refused(unstarted, api.AdoptRequest{Domain: "instance-" + unstarted[:8]}, 404, api.CodeSecretNotFound)

	// A state keyed with another passphrase than the key manager's.
	wrong := uuid.NewString()
	wsid, _ := novaSecret("nova-project", wrong)
	other, _ := keyring.NewVTPMSecret()
	wdom := defineBareGuest(t, lv, wrong, "instance-"+wrong[:8], wsid)
	novaStart(t, lv, wdom, wrong, wsid, other)
	refused(wrong, api.AdoptRequest{Domain: "instance-" + wrong[:8]}, 409, api.CodeWrongSecret)
	refused(id, api.AdoptRequest{Domain: dom.Name, SecretRef: wsid}, 409, api.CodeWrongSecret) // the domain names another

	// A vTPM vtpmd made itself is managed already.
	mine := uuid.NewString()
	u.create(t, mine, "2.0")
	u.wait(t, mine, "active")
	refused(mine, api.AdoptRequest{Domain: dom.Name}, 409, api.CodeAlreadyManaged)

	// The adoption: the secret's project, the domain's spec, the guest off.
	v, err := u.c.Adopt(ctx, id, api.AdoptRequest{Domain: dom.Name})
	if err != nil {
		t.Fatal(err)
	}
	if v.Project != "nova-project" || v.SecretRef != sid || v.Domain != dom.Name || v.Host != "lv-host" || v.Desired != "stopped" ||
		v.Spec.Version != "2.0" || v.Spec.Model == nil || *v.Spec.Model != "tpm-crb" || v.Spec.SecretSecurity != "user" {
		t.Fatalf("adopted: %+v", v)
	}
	u.wait(t, id, "stopped")
	again, err := u.c.Adopt(ctx, id, api.AdoptRequest{Domain: dom.Name})
	if err != nil || again.Incarnation != v.Incarnation {
		t.Fatalf("adopting again: %+v %v", again, err)
	}
	// Adopted, the secret keys a managed vTPM: no other domain's takes it.
	dup := uuid.NewString()
	defineBareGuest(t, lv, dup, "instance-"+dup[:8], sid)
	refused(dup, api.AdoptRequest{Domain: "instance-" + dup[:8]}, 409, api.CodeAlreadyManaged)
	if fileSum(t, permall) != before {
		t.Fatal("adoption rewrote the TPM state")
	}
	if got, err := kr.Get(ctx, sid); err != nil || !bytes.Equal(got.Payload, passphrase) {
		t.Fatalf("the key-manager secret after adoption: %v", err)
	}
	identity, err := u.c.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := pem.Decode([]byte(identity.EKs[0].PublicKeyPEM)); b == nil || !bytes.Equal(b.Bytes, ekDER) {
		t.Fatal("vtpmd recorded another EK than the one the TPM holds")
	}

	// vtpmd starts the guest with its TPM, and stops it.
	if _, err := u.c.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "active")
	if guestState(t, lv, dom) != golibvirt.DomainRunning {
		t.Fatal("the adopted guest does not run after start")
	}
	if _, err := u.c.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "stopped")
	waitNoProcesses(t, filepath.Dir(state))
	onState(t, state, passphrase, func(tpm transport.TPM) {
		if got := nvRead(t, tpm, userIndex); !bytes.Equal(got, data) {
			t.Fatalf("NV data after vtpmd ran the guest: %q", got)
		}
	})
	if !bytes.Equal(rsaEK(t, state, passphrase), ekDER) {
		t.Fatal("the EK changed")
	}

	// Delete: the guest loses its TPM; state and secrets go.
	if _, err := u.c.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.waitGone(t, id)
	if tpms := guestTPM(t, lv, dom); len(tpms) != 0 {
		t.Fatalf("guest still has TPM devices: %+v", tpms)
	}
	if _, err := os.Stat(filepath.Dir(state)); !os.IsNotExist(err) {
		t.Fatalf("state %s remains: %v", state, err)
	}
	if _, err := kr.Get(ctx, sid); !errors.Is(err, keyring.ErrNotFound) {
		t.Fatalf("the key-manager secret after delete: %v", err)
	}
	if scratch, _ := filepath.Glob(filepath.Join(dir, "*", ".identify-*")); len(scratch) > 0 {
		t.Fatalf("copies of adopted state remain: %v", scratch)
	}
}
