package daemon

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/keyrelease"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// TestGuestSecretRelease boots a real UEFI guest (TCG, two boots) whose
// /init is the guest agent with the key broker's guest side, on an
// attested host. First boot: registered, pending; the test learns the
// boot as the policy and stores the secret for the instance; the guest
// gets it (inside its vTPM), decrypts a file sealed under it, and waits.
// The host reboots into another kernel and turns untrusted: the release
// is revoked, the guest's revocation action runs (its output on the
// serial console) and its next request is refused. The wrapped answer,
// copied off the console, opens in no other vTPM. Second boot, the host
// trusted again, with another kernel command line: refused, not_trusted,
// naming PCR 9.
func TestGuestSecretRelease(t *testing.T) {
	lv := connectLibvirt(t)
	dir := t.TempDir()
	th := newTestHost(t, dir, "host kernel 6.1")
	u := startConfigured(t, th.attests(Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "lv-host", Backend: "libvirt",
		Libvirt: LibvirtConfig{Mode: "emulator", EnableVTPM: true}}))
	ctx := context.Background()
	host := client.Host("lv-host")
	_, port, _ := strings.Cut(u.d.Addr, ":")

	// The file the secret opens: AES-256-GCM under the secret (the key),
	// nonce first, on the kernel command line (it is ciphertext).
	key := make([]byte, 32)
	rand.Read(key)
	block, _ := aes.NewCipher(key)
	gcm, _ := cipher.NewGCM(block)
	nonce := make([]byte, 12)
	rand.Read(nonce)
	const plaintext = "the-tenant's-disk-is-open"
	sealed := base64.StdEncoding.EncodeToString(gcm.Seal(nonce, nonce, []byte(plaintext), nil))

	id := uuid.NewString()
	console := filepath.Join(dir, "console.log")
	dom := defineGuestWith(t, lv, id, dir, guestOptions{init: attestInit, network: true,
		cmdline: "vtpmd.server=http://10.0.2.2:" + port + " vtpmd.secret=disk vtpmd.sealed=" + sealed})
	if _, err := u.c.Create(ctx, api.CreateVTPMRequest{InstanceID: id, Project: "p1",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}}}); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "active")

	t.Log("step 0: the host agent attests the host's own TPM; its boot becomes the host's policy")
	if _, err := u.d.AttestHost(ctx); err != nil {
		t.Fatal(err)
	}
	if h, err := u.c.SetPolicy(ctx, host, api.PolicyRequest{Learn: true}); err != nil || h.Verdict != "trusted" {
		t.Fatalf("learning the host's policy: %+v %v", h, err)
	}

	t.Logf("step 1: booting guest %s (TCG); it registers and attests, pending", dom.Name)
	u.attach(t, id, dom.Name)
	if out := waitConsole(t, console, "VTPM-GUEST VERDICT"); !strings.Contains(out, "VTPM-GUEST VERDICT pending") {
		t.Fatalf("first boot:\n%s", out)
	}
	t.Log("step 2: the host attests again (the boot took a while); learning this boot as the policy; storing secret disk for the instance")
	if h, err := u.d.AttestHost(ctx); err != nil || h.Verdict != "trusted" {
		t.Fatalf("the host attesting again: %+v %v", h, err)
	}
	if a, err := u.c.SetPolicy(ctx, client.Instance(id), api.PolicyRequest{Learn: true}); err != nil || a.Overall != "trusted" {
		t.Fatalf("learning from the first boot: %+v %v", a, err)
	}
	p1 := client.New(u.d.OperatorURL, "p1") // the operator acting as project p1
	if _, err := p1.CreateBrokerSecret(ctx, api.CreateBrokerSecretRequest{Name: "disk", Payload: key, ReleaseTo: []string{id}}); err != nil {
		t.Fatal(err)
	}
	out := waitConsole(t, console, "VTPM-GUEST DECRYPTED")
	if !strings.Contains(out, "VTPM-GUEST DECRYPTED "+plaintext) {
		t.Fatalf("the guest did not decrypt the file:\n%s", out)
	}
	t.Logf("        the guest got the secret in its vTPM and decrypted the file")
	m := regexp.MustCompile(`VTPM-GUEST WRAPPED (\S+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no wrapped answer on the console:\n%s", out)
	}
	var ws api.WrappedSecret
	raw, _ := base64.StdEncoding.DecodeString(m[1])
	if err := json.Unmarshal(raw, &ws); err != nil {
		t.Fatal(err)
	}

	t.Log("step 3: the host reboots into another kernel; its agent attests: untrusted, the release revoked")
	th.reboot(t, "host kernel 6.1 with a rootkit")
	u.d.AttestHost(ctx) // the reboot broke the agent's connection: it reconnects on the next try
	if h, err := u.d.AttestHost(ctx); err != nil || h.Verdict != "untrusted" {
		t.Fatalf("host after the reboot: %+v %v", h, err)
	}
	out = waitConsole(t, console, "VTPM-GUEST REFUSED")
	for _, want := range []string{"VTPM-GUEST REVOKED disk", "VTPM-GUEST ACTION -c close-disk VTPM_SECRET=disk", "VTPM-GUEST REFUSED not_trusted"} {
		if !strings.Contains(out, want) {
			t.Fatalf("the guest's console lacks %q:\n%s", want, out)
		}
	}
	t.Log("        the guest ran its revocation action; asked again, refused not_trusted")
	t.Logf("        %s", regexp.MustCompile(`VTPM-GUEST ACTION [^\n]*`).FindString(out))
	sec, err := p1.BrokerSecret(ctx, "disk")
	// Revoked as soon as the host stopped being trusted: when its agent
	// registered the rebooted TPM again (pending), before its evidence
	// made it untrusted.
	if err != nil || len(sec.Releases) != 1 || sec.Releases[0].RevokedAt.IsZero() || !strings.Contains(sec.Releases[0].Reason, "VM trusted, but host lv-host is ") {
		t.Fatalf("the release after the host turned untrusted: %+v %v", sec, err)
	}
	evs, err := u.c.Events(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, e := range evs.Items {
		if strings.HasPrefix(e.Action, "secret ") {
			actions = append(actions, e.Action)
		}
	}
	if !strings.HasSuffix(strings.Join(actions, ","), "secret released,secret revoked,secret refused") {
		t.Fatalf("the instance's secret events: %v", actions)
	}

	t.Log("step 4: the wrapped answer, copied off the console, replayed against another vTPM")
	other, ident := swtpmtest.Manufactured(t, spec.V20, nil)
	swtpmtest.Start(t, other)
	tpm := dialTPM(t, other.DataSocket())
	ak, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(attest.RSAAKTemplate)}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	w, err := keyrelease.Parse(ws.Wrapped)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := keyrelease.Unwrap(tpm, tpm2.NamedHandle{Handle: ak.ObjectHandle, Name: ak.Name}, tpm2.TPMHandle(swtpm.RSAEKHandle), w); err == nil || got != nil {
		t.Fatalf("another vTPM opened the guest's release: %q", got)
	} else {
		t.Logf("        another vTPM: %v", err)
	}
	// That vTPM works: a release wrapped for it opens there.
	own, err := keyrelease.Wrap(ident.EKs[0].Public, ak.Name.Buffer, nil, []byte("its own"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := keyrelease.Unwrap(tpm, tpm2.NamedHandle{Handle: ak.ObjectHandle, Name: ak.Name}, tpm2.TPMHandle(swtpm.RSAEKHandle), own); err != nil || string(got) != "its own" {
		t.Fatalf("the other vTPM opening a release wrapped for it: %q %v", got, err)
	}

	t.Log("step 5: the host back on its kernel; the guest booted with another kernel command line")
	th.reboot(t, "host kernel 6.1")
	u.d.AttestHost(ctx)
	if h, err := u.d.AttestHost(ctx); err != nil || h.Verdict != "trusted" {
		t.Fatalf("host back on its kernel: %+v %v", h, err)
	}
	if _, err := u.c.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "stopped")
	d := definition(t, lv, dom)
	d.OS.Cmdline += " quiet"
	xml, _ := d.Marshal()
	if _, err := lv.DomainDefineXML(xml); err != nil {
		t.Fatal(err)
	}
	if _, err := u.c.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "active")
	out = waitConsole(t, console, "VTPM-GUEST REFUSED")
	if !strings.Contains(out, "VTPM-GUEST VERDICT untrusted PCR 9") || !regexp.MustCompile(`VTPM-GUEST REFUSED not_trusted: .*PCR 9`).MatchString(out) {
		t.Fatalf("booted another way:\n%s", out)
	}
	t.Log("        refused: not_trusted, PCR 9 named")
}
