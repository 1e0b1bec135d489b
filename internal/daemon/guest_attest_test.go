package daemon

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// TestGuestAttestation boots a real UEFI guest with a vTPM from vtpmd whose
// /init runs the guest agent over QEMU user networking, on a host whose own
// TPM (a swtpm from a "vendor" CA, with measurements the test makes) the
// host agent attests: registered and pending at first boot; trusted on a
// trusted host after the policies are learned and the guest boots the same
// way again; running on an untrusted host, naming the host's PCR 4, when
// the host reboots into another kernel; untrusted, naming PCR 9, when the
// guest boots with another kernel command line. Then the attacks: the
// guest's last evidence replayed, a quote signed by another key, another
// TPM registering for the instance.
func TestGuestAttestation(t *testing.T) {
	lv := connectLibvirt(t)
	dir := t.TempDir()
	th := newTestHost(t, dir, "host kernel 6.1")
	u := startConfigured(t, th.attests(Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "lv-host", Backend: "libvirt",
		Libvirt: LibvirtConfig{Mode: "emulator", EnableVTPM: true}}))
	ctx := context.Background()
	host := client.Host("lv-host")
	// The guest reaches vtpmd through a proxy that keeps its last evidence.
	rec := recordEvidence(t, u.d.Addr)
	_, port, _ := strings.Cut(rec.addr, ":")
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
		t.Logf("        VM verdict: %s %s", a.Verdict, strings.Join(a.Reasons, "; "))
		t.Logf("        overall: %s (%s)", a.Overall, a.Summary)
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

	t.Log("step 0: the host agent attests the host's own TPM; its boot becomes the host's policy")
	if _, err := u.d.AttestHost(ctx); err != nil {
		t.Fatal(err)
	}
	if h, err := u.c.SetPolicy(ctx, host, api.PolicyRequest{Learn: true}); err != nil || h.Verdict != "trusted" {
		t.Fatalf("learning the host's policy: %+v %v", h, err)
	}
	t.Logf("        host verdict: trusted")

	t.Logf("step 1: vTPM %s made and certified; attaching it to guest %s and booting (TCG, ≈20 s)", id, dom.Name)
	// First boot: registered, no policy yet.
	u.attach(t, id, dom.Name)
	boot("pending")
	t.Log("step 2: the guest agent registered (credential activation) and attested; learning this boot as the policy")
	if a, err := u.c.SetPolicy(ctx, client.Instance(id), api.PolicyRequest{Learn: true}); err != nil || a.Verdict != "trusted" {
		t.Fatalf("learning from the first boot: %+v %v", a, err)
	}

	// The same boot again: trusted.
	t.Log("step 3: stopping the guest and booting it the same way again")
	restart(nil)
	a := boot("trusted")
	if a.Overall != "trusted" || a.Summary != "VM trusted on trusted host lv-host" {
		t.Fatalf("overall: %s (%s)", a.Overall, a.Summary)
	}
	// The guest kernel's IMA log (its boot_aggregate) replayed to PCR 10.
	if a.IMAEntries < 1 {
		t.Fatalf("no IMA entries judged: %+v", a)
	}
	t.Logf("        IMA: %d entries replay to the quoted PCR 10", a.IMAEntries)
	p, err := u.c.CreatePolicy(ctx, api.CreatePolicyRequest{Name: "ima-allowlist", Project: "p1",
		LearnFrom: &api.LearnFrom{InstanceID: id, PCRs: []int{10}, Digests: true}})
	if err != nil || len(p.Digests[10]) != a.IMAEntries {
		t.Fatalf("learning IMA's file digests: %+v %v", p, err)
	}
	t.Logf("        named policy %s: the %d file digests IMA measured", p.Name, len(p.Digests[10]))

	// The host reboots into another kernel: the VM runs on an untrusted host.
	t.Log("step 4: the host reboots into another kernel; its agent attests again")
	th.reboot(t, "host kernel 6.1 with a rootkit")
	u.d.AttestHost(ctx) // the reboot broke the agent's connection: it reconnects on the next try
	if h, err := u.d.AttestHost(ctx); err != nil || h.Verdict != "untrusted" {
		t.Fatalf("host after the reboot: %+v %v", h, err)
	}
	a, err = u.c.Attestation(ctx, client.Instance(id))
	if err != nil || a.Overall != "untrusted" || !strings.Contains(a.Summary, "host lv-host is untrusted: PCR 4") {
		t.Fatalf("VM on an untrusted host: %+v %v", a, err)
	}
	t.Logf("        overall: %s (%s)", a.Overall, a.Summary)

	// Another kernel command line: PCR 9 (the EFI stub measures it) differs.
	t.Log("step 5: booting the guest with another kernel command line (\"quiet\" added)")
	restart(func(d *libvirtxml.Domain) { d.OS.Cmdline += " quiet" })
	a = boot("untrusted")
	if len(a.Reasons) == 0 || !strings.Contains(a.Reasons[0], "PCR 9") {
		t.Fatalf("untrusted for %v; want PCR 9 named", a.Reasons)
	}
	// IMA's boot_aggregate covers PCRs 0–9: the allowlist sees it too.
	a, err = u.c.SetPolicy(ctx, client.Instance(id), api.PolicyRequest{Policy: "ima-allowlist"})
	if err != nil || a.Verdict != "untrusted" || !strings.HasPrefix(strings.Join(a.Reasons, ";"), "PCR 10: boot_aggregate (sha256:") {
		t.Fatalf("judged by the IMA allowlist: %+v %v", a, err)
	}
	t.Logf("        by policy ima-allowlist: %s %s", a.Verdict, strings.Join(a.Reasons, "; "))

	t.Log("step 6: attacks: the guest's last evidence replayed; a quote by another key; another TPM registering")
	var e *client.Error
	last, token := rec.last()
	if _, err := u.c.Evidence(ctx, client.Instance(id), last); !asCode(err, &e, api.CodeUnauthenticated) {
		t.Fatalf("replayed evidence without the agent's token: %v", err)
	}
	t.Logf("        replayed without the agent's token: refused, %s", e.Code)
	// An attacker on the path also took the agent's token.
	stolen := u.c.WithAgentToken(token)
	if _, err := stolen.Evidence(ctx, client.Instance(id), last); !asCode(err, &e, api.CodeStaleNonce) {
		t.Fatalf("replayed evidence: %v", err)
	}
	t.Logf("        replayed with the agent's token: refused, %s", e.Code)
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	n, err := stolen.Nonce(ctx, client.Instance(id))
	if err != nil {
		t.Fatal(err)
	}
	forged := api.EvidenceRequest{Nonce: n.Nonce, PCRs: last.PCRs, EventLog: last.EventLog}
	if forged.Attest, forged.Signature, err = attesttest.Quote(key, n.Nonce, last.PCRs, 1<<40); err != nil {
		t.Fatal(err)
	}
	if a, err = stolen.Evidence(ctx, client.Instance(id), forged); err != nil || a.Verdict != "untrusted" ||
		!strings.Contains(strings.Join(a.Reasons, " "), "not signed by the registered attestation key") {
		t.Fatalf("a quote by another key: %+v %v", a, err)
	}
	t.Logf("        quote by another key: %s, %s", a.Verdict, a.Reasons[0])
	other, _ := swtpmtest.Manufactured(t, spec.V20, nil)
	swtpmtest.Start(t, other)
	impostor := &attestor.Agent{TPM: dialTPM(t, other.DataSocket()), API: u.c, Subject: client.Instance(id)}
	if err := impostor.Register(ctx); !asCode(err, &e, api.CodeEKMismatch) {
		t.Fatalf("registering another TPM's EK: %v", err)
	}
	t.Logf("        another TPM: registration refused, %s", e.Code)
}

// evidenceRecorder is a proxy in front of vtpmd that keeps the last
// evidence a guest pushed through it, and the agent's token.
type evidenceRecorder struct {
	addr  string
	mu    sync.Mutex
	ev    api.EvidenceRequest
	token string
}

func recordEvidence(t *testing.T, target string) *evidenceRecorder {
	t.Helper()
	rec := &evidenceRecorder{}
	proxy := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: target})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/attestation/evidence") {
			body, _ := io.ReadAll(r.Body)
			rec.mu.Lock()
			json.Unmarshal(body, &rec.ev)
			rec.token = strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
			rec.mu.Unlock()
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	rec.addr = srv.Listener.Addr().String()
	return rec
}

func (r *evidenceRecorder) last() (api.EvidenceRequest, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ev, r.token
}
