package daemon

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
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
	onStateSocket(t, dir, passphrase, func(sock string) { withTPM(t, sock, fn) })
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

// novaStore stores a new vTPM passphrase for instance in Barbican as Nova
// does through castellan (its POST, with token: a user's in user mode,
// Nova's service user's in deployment mode), and returns the secret's
// UUID (Nova's vtpm_secret_uuid) and the passphrase.
func novaStore(t *testing.T, barbicanURL, token, instance string) (string, []byte) {
	t.Helper()
	passphrase, err := keyring.NewVTPMSecret()
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(map[string]string{"name": keyring.VTPMSecretName(instance), "secret_type": "passphrase",
		"payload": base64.StdEncoding.EncodeToString(passphrase), "payload_content_type": "application/octet-stream",
		"payload_content_encoding": "base64"})
	var created struct {
		Ref string `json:"secret_ref"`
	}
	if status := barbicanCall(t, http.MethodPost, barbicanURL+"/v1/secrets/", token, body, &created); status != http.StatusCreated {
		t.Fatalf("Nova's store of a vTPM secret: %d", status)
	}
	return created.Ref[strings.LastIndex(created.Ref, "/")+1:], passphrase
}

// barbicanCall sends a JSON request with token, decoding the answer into
// out if it is not nil; it returns the status.
func barbicanCall(t *testing.T, method, url, token string, body []byte, out any) int {
	t.Helper()
	req, _ := http.NewRequest(method, url, bytes.NewReader(body))
	req.Header.Set("X-Auth-Token", token)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if out != nil {
		if err := json.NewDecoder(res.Body).Decode(out); err != nil {
			t.Fatalf("%s %s: %d, %v", method, url, res.StatusCode, err)
		}
	}
	return res.StatusCode
}

// whoAmI is the user and project of token, as Keystone validates it.
func whoAmI(t *testing.T, keystoneURL, token string) (user, project string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, strings.TrimSuffix(keystoneURL, "/")+"/auth/tokens", nil)
	req.Header.Set("X-Auth-Token", token)
	req.Header.Set("X-Subject-Token", token)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var v struct {
		Token struct {
			User    struct{ ID string } `json:"user"`
			Project struct{ ID string } `json:"project"`
		} `json:"token"`
	}
	if err := json.NewDecoder(res.Body).Decode(&v); err != nil || v.Token.User.ID == "" {
		t.Fatalf("validating a token: %d, %v", res.StatusCode, err)
	}
	return v.Token.User.ID, v.Token.Project.ID
}

// novaGuest makes the vTPM Nova makes for a new instance with its secret
// in Barbican (stored with token): the libvirt guest keyed by it, started
// once (libvirt's swtpm_setup), with NV data written into its TPM. It
// returns the instance, its domain, the secret's UUID, the passphrase,
// the NV data and the TPM's RSA EK.
func novaGuest(t *testing.T, lv *golibvirt.Libvirt, barbicanURL, token string) (id string, dom golibvirt.Domain, sid string, passphrase, data, ekDER []byte) {
	t.Helper()
	id = uuid.NewString()
	sid, passphrase = novaStore(t, barbicanURL, token, id)
	dom = defineBareGuest(t, lv, id, "instance-"+id[:8], sid)
	novaStart(t, lv, dom, id, sid, passphrase)
	state := filepath.Join("/var/lib/libvirt/swtpm", id, "tpm2")
	data = []byte("NV data of instance " + id)
	onState(t, state, passphrase, func(tpm transport.TPM) { nvWrite(t, tpm, data) })
	return id, dom, sid, passphrase, data, rsaEK(t, state, passphrase)
}

// TestBarbicanAdopt takes over vTPMs Nova made with its secrets in the
// real Barbican, with vtpmd's key manager that Barbican:
//
//   - deployment: Nova's service user (vtpmd's here) stored the secret in
//     the service project. The adoption reads it, records the vTPM as the
//     deployment's (the operator starts and stops it alone), NV data and
//     EK survive vtpmd's start and stop, and the delete shreds the secret.
//   - user: the secret is in the instance owner's project. Without a
//     project the adoption is refused (Barbican does not tell it); with
//     no ACL for vtpmd's service user, secret_needs_owner; with one
//     (read.users), the vTPM is adopted as the owner's: the operator's
//     start is refused with secret_needs_owner, the owner's runs it.
//
// Each refusal leaves no record.
func TestBarbicanAdopt(t *testing.T) {
	lv := connectLibvirt(t)
	ctx := context.Background()
	d := startBarbicanDaemonAs(t, "barbican", 0, "vtpmd", func(c *Config) {
		c.HostName, c.Backend, c.Libvirt = "lv-host", "libvirt", LibvirtConfig{Mode: "emulator", EnableVTPM: true}
	})
	serviceTok, memberTok := d.token(t, "vtpmd"), d.token(t, "vtpmd-a")
	serviceUser, _ := whoAmI(t, d.os.KeystoneURL, serviceTok)
	_, projectA := whoAmI(t, d.os.KeystoneURL, memberTok)
	refused := func(id string, req api.AdoptRequest, status int, code api.Code) {
		t.Helper()
		_, err := d.c.Adopt(ctx, id, req)
		var e *client.Error
		if !errors.As(err, &e) || e.Status != status || e.Code != code {
			t.Fatalf("adopting %s %+v: %v, want %d %s", id, req, err, status, code)
		}
		if _, err := d.c.Get(ctx, id); !client.IsNotFound(err) {
			t.Fatalf("a refused adoption left a record of %s: %v", id, err)
		}
	}

	t.Run("deployment", func(t *testing.T) {
		id, dom, sid, passphrase, data, ekDER := novaGuest(t, lv, d.os.BarbicanURL, serviceTok)
		state := filepath.Join("/var/lib/libvirt/swtpm", id, "tpm2")
		refused(id, api.AdoptRequest{Domain: dom.Name}, 400, api.CodeInvalidParameter)
		v, err := d.c.Adopt(ctx, id, api.AdoptRequest{Domain: dom.Name, Project: projectA})
		if err != nil {
			t.Fatal(err)
		}
		if v.Project != projectA || v.SecretRef != sid || v.Spec.SecretSecurity != "deployment" || v.Desired != "stopped" {
			t.Fatalf("adopted: %+v", v)
		}
		d.wait(t, id, "stopped")
		identity, err := d.c.Identity(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if b, _ := pem.Decode([]byte(identity.EKs[0].PublicKeyPEM)); b == nil || !bytes.Equal(b.Bytes, ekDER) {
			t.Fatal("vtpmd recorded another EK than the one the TPM holds")
		}

		// The operator alone starts and stops it: vtpmd reads the secret.
		if _, err := d.c.Start(ctx, id); err != nil {
			t.Fatal(err)
		}
		d.wait(t, id, "active")
		if guestState(t, lv, dom) != golibvirt.DomainRunning {
			t.Fatal("the adopted guest does not run after start")
		}
		if _, err := d.c.Stop(ctx, id); err != nil {
			t.Fatal(err)
		}
		d.wait(t, id, "stopped")
		waitNoProcesses(t, filepath.Dir(state))
		onState(t, state, passphrase, func(tpm transport.TPM) {
			if got := nvRead(t, tpm, userIndex); !bytes.Equal(got, data) {
				t.Fatalf("NV data after vtpmd ran the guest: %q", got)
			}
		})
		if !bytes.Equal(rsaEK(t, state, passphrase), ekDER) {
			t.Fatal("the EK changed")
		}

		if _, err := d.c.Delete(ctx, id); err != nil {
			t.Fatal(err)
		}
		d.waitGone(t, id)
		if status, _ := castellanGet(t, d.os.BarbicanURL, serviceTok, sid); status != http.StatusNotFound {
			t.Fatalf("Nova's read of the secret after the delete: %d, want 404", status)
		}
	})

	t.Run("user", func(t *testing.T) {
		id, dom, sid, passphrase, data, _ := novaGuest(t, lv, d.os.BarbicanURL, memberTok)
		state := filepath.Join("/var/lib/libvirt/swtpm", id, "tpm2")
		refused(id, api.AdoptRequest{Domain: dom.Name}, 400, api.CodeInvalidParameter)
		refused(id, api.AdoptRequest{Domain: dom.Name, Project: projectA}, 403, api.CodeSecretNeedsOwner)

		// The owner grants vtpmd's service user read, as Barbican's ACLs do.
		acl, _ := json.Marshal(map[string]any{"read": map[string]any{"users": []string{serviceUser}, "project-access": true}})
		if status := barbicanCall(t, http.MethodPut, d.os.BarbicanURL+"/v1/secrets/"+sid+"/acl", memberTok, acl, nil); status != http.StatusOK {
			t.Fatalf("the owner's ACL for vtpmd's service user: %d", status)
		}
		v, err := d.c.Adopt(ctx, id, api.AdoptRequest{Domain: dom.Name, Project: projectA})
		if err != nil {
			t.Fatal(err)
		}
		if v.Project != projectA || v.SecretRef != sid || v.Spec.SecretSecurity != "user" {
			t.Fatalf("adopted: %+v", v)
		}
		d.wait(t, id, "stopped")
		if _, err := d.c.Start(ctx, id); client.ErrorCode(err) != api.CodeSecretNeedsOwner {
			t.Fatalf("the operator's start of the owner's vTPM: %v, want %s", err, api.CodeSecretNeedsOwner)
		}
		member := d.as(t, "vtpmd-a")
		if _, err := member.Start(ctx, id); err != nil {
			t.Fatal(err)
		}
		d.wait(t, id, "active")
		if _, err := member.Stop(ctx, id); err != nil {
			t.Fatal(err)
		}
		d.wait(t, id, "stopped")
		waitNoProcesses(t, filepath.Dir(state))
		onState(t, state, passphrase, func(tpm transport.TPM) {
			if got := nvRead(t, tpm, userIndex); !bytes.Equal(got, data) {
				t.Fatalf("NV data after vtpmd ran the guest: %q", got)
			}
		})
		if _, err := member.Delete(ctx, id); err != nil {
			t.Fatal(err)
		}
		d.waitGone(t, id)
		if status, _ := castellanGet(t, d.os.BarbicanURL, memberTok, sid); status != http.StatusNotFound {
			t.Fatalf("the owner's read of the secret after its delete: %d, want 404", status)
		}
	})
}
