package daemon

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// firmwareLog is the event log OVMF wrote into a vtpmd vTPM in a real boot
// (internal/attest's fixture).
func firmwareLog(t *testing.T) []byte {
	t.Helper()
	log, err := os.ReadFile("../attest/testdata/ovmf-q35-eventlog.bin")
	if err != nil {
		t.Fatal(err)
	}
	return log
}

// boot plays firmware: it extends every event of log into the TPM, so its
// PCRs are what that boot measured.
func boot(t *testing.T, tpm transport.TPM, log []byte) {
	t.Helper()
	events, err := attest.ParseEventLog(log)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range events {
		if e.Type == 3 { // EV_NO_ACTION is not extended
			continue
		}
		_, err := tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(e.PCR), Auth: tpm2.PasswordAuth(nil)},
			Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: e.Digest}}}}.Execute(tpm)
		if err != nil {
			t.Fatalf("extending event %d: %v", e.Index, err)
		}
	}
}

// otherKernel is log with the kernel's measurement (the first
// EV_EFI_BOOT_SERVICES_APPLICATION, into PCR 4) replaced.
func otherKernel(t *testing.T, log []byte) []byte {
	t.Helper()
	out := bytes.Clone(log)
	events, _ := attest.ParseEventLog(log)
	for _, e := range events {
		if e.Type == 0x80000003 {
			i := bytes.Index(out, e.Digest)
			copy(out[i:], bytes.Repeat([]byte{0x4b}, 32))
			return out
		}
	}
	t.Fatal("no boot application in the log")
	return nil
}

func dialTPM(t *testing.T, sock string) transport.TPM {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(2 * time.Minute))
	return swtpm.Retrying(transport.FromReadWriter(conn))
}

// TestAttestation runs the attestation protocol end to end over the real
// API with the guest agent's code on a vTPM vtpmd made: registration by
// credential activation, pending without a policy, learning it, trusted,
// a boot with another kernel untrusted naming PCR 4 and its event, a
// replayed quote, a quote by an unregistered key, a foreign EK, and an AK
// from another TPM.
func TestAttestation(t *testing.T) {
	dir := t.TempDir()
	hook := newHookReceiver(t)
	u := startConfigured(t, Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "test-host", WebhookURL: hook.srv.URL})
	ctx := context.Background()
	id := "0a0a0a0a-0000-4000-8000-0000000a7e57"
	v := u.create(t, id, "2.0")
	log := firmwareLog(t)
	logPath := filepath.Join(dir, "binary_bios_measurements")
	os.WriteFile(logPath, log, 0o644)

	tpm := dialTPM(t, v.Sockets.Data)
	boot(t, tpm, log)
	agent := &attestor.Agent{TPM: tpm, API: u.agents, Subject: client.Instance(id), EventLog: logPath}
	if err := agent.Register(ctx); err != nil {
		t.Fatal(err)
	}
	a, err := agent.Attest(ctx)
	if err != nil || a.State != "registered" || a.Verdict != "pending" {
		t.Fatalf("first evidence: %+v %v", a, err)
	}
	if a, err = u.c.SetPolicy(ctx, client.Instance(id), api.PolicyRequest{Learn: true}); err != nil || a.Verdict != "trusted" || len(a.PolicyPCRs) != 10 {
		t.Fatalf("learning: %+v %v", a, err)
	}
	if a, err = agent.Attest(ctx); err != nil || a.Verdict != "trusted" {
		t.Fatalf("second evidence: %+v %v", a, err)
	}

	// A relying party checks the signed verdict offline.
	tok, err := u.c.VerdictToken(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := u.c.VerdictKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	payload, err := attest.VerifyToken(tok, attest.TokenOptions{JWKS: keys, Issuer: attest.TokenIssuer, Instance: id, Now: time.Now()})
	var claims struct{ Sub, Verdict, Project string }
	if err != nil || json.Unmarshal(payload, &claims) != nil || claims.Sub != id || claims.Verdict != "trusted" || claims.Project != "p1" {
		t.Fatalf("verdict token: %s %v", payload, err)
	}

	// Without the agent's token nobody gets a nonce or pushes evidence,
	// and the agent's nonce stays unspent.
	var e *client.Error
	if _, err := u.agents.Nonce(ctx, client.Instance(id)); !asCode(err, &e, api.CodeUnauthenticated) || e.Status != 401 {
		t.Fatalf("a nonce without the agent's token: %v", err)
	}
	n, _ := agent.API.Nonce(ctx, client.Instance(id))
	ev, err := agent.Evidence(n.Nonce)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.agents.Evidence(ctx, client.Instance(id), ev); !asCode(err, &e, api.CodeUnauthenticated) {
		t.Fatalf("evidence without the agent's token: %v", err)
	}
	if _, err := agent.API.Evidence(ctx, client.Instance(id), ev); err != nil {
		t.Fatal(err)
	}
	// A stranger starts a registration for the instance (the EK is public;
	// its AK is a software key): it cannot complete it, and the registered
	// agent attests on undisturbed.
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	identity, _ := u.c.Identity(ctx, id)
	ekBlock, _ := pem.Decode([]byte(identity.EKs[0].PublicKeyPEM))
	stranger := func() api.CredentialChallenge {
		t.Helper()
		ch, err := u.agents.Register(ctx, client.Instance(id), api.RegisterRequest{EKPublic: ekBlock.Bytes,
			AKPublic: attesttest.AKPublic(attest.RSAAKTemplate, key)})
		if err != nil {
			t.Fatalf("a registration anyone may start: %v", err)
		}
		return ch
	}
	eventsBefore, _ := u.c.Events(ctx, id)
	for range 50 {
		stranger()
	}
	ch := stranger()
	if _, err := u.agents.Activate(ctx, client.Instance(id), api.ActivateRequest{Ticket: ch.Ticket, Secret: make([]byte, 32)}); !asCode(err, &e, api.CodeActivationFailed) {
		t.Fatalf("activating without the TPM: %v", err)
	}
	if a, err := agent.Attest(ctx); err != nil || a.State != "registered" || a.Verdict != "trusted" {
		t.Fatalf("the registered agent after a stranger's registration: %+v %v", a, err)
	}
	// Unproven registrations write nothing: no event, no record.
	if events, _ := u.c.Events(ctx, id); len(events.Items) != len(eventsBefore.Items) {
		t.Fatalf("51 strangers' registrations left %d events", len(events.Items)-len(eventsBefore.Items))
	}
	// A stranger's registrations between the agent's registration and
	// its activation disturb nothing: the agent registers anew through a
	// proxy that lets a stranger register right before each activation.
	meddler := meddle(t, u.d.Addr, func() { stranger() })
	for i := range 3 {
		agent.Flush()
		again := &attestor.Agent{TPM: tpm, API: client.New("http://"+meddler, ""), Subject: client.Instance(id), EventLog: logPath}
		if err := again.Register(ctx); err != nil {
			t.Fatalf("registration %d with a stranger's in between: %v", i, err)
		}
		agent = again
	}

	// An old quote replayed: its nonce is spent.
	if _, err := agent.API.Evidence(ctx, client.Instance(id), ev); !asCode(err, &e, api.CodeStaleNonce) {
		t.Fatalf("replayed evidence: %v", err)
	}

	// Reboot with another kernel: untrusted, naming PCR 4 and the event.
	if _, err := u.c.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "stopped")
	if _, err := u.c.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "active")
	tpm = dialTPM(t, v.Sockets.Data)
	other := otherKernel(t, log)
	os.WriteFile(logPath, other, 0o644)
	boot(t, tpm, other)
	agent = &attestor.Agent{TPM: tpm, API: u.agents, Subject: client.Instance(id), EventLog: logPath}
	if err := agent.Register(ctx); err != nil {
		t.Fatal(err)
	}
	a, err = agent.Attest(ctx)
	if err != nil || a.Verdict != "untrusted" || len(a.Reasons) != 1 || !strings.Contains(a.Reasons[0], "PCR 4") ||
		!strings.Contains(a.Reasons[0], "EV_EFI_BOOT_SERVICES_APPLICATION") {
		t.Fatalf("other kernel: %+v %v", a, err)
	}

	// Another instance's guest, registered for its own vTPM: its quote
	// pushed for this instance is refused, and it cannot register here
	// with its own EK.
	id2 := "0a0a0a0a-0000-4000-8000-0000000a7e58"
	v2 := u.create(t, id2, "2.0")
	tpm2nd := dialTPM(t, v2.Sockets.Data)
	boot(t, tpm2nd, log)
	neighbour := &attestor.Agent{TPM: tpm2nd, API: u.agents, Subject: client.Instance(id2), EventLog: logPath}
	if err := neighbour.Register(ctx); err != nil {
		t.Fatal(err)
	}
	n, _ = agent.API.Nonce(ctx, client.Instance(id))
	if ev, err = neighbour.Evidence(n.Nonce); err != nil {
		t.Fatal(err)
	}
	if _, err = neighbour.API.Evidence(ctx, client.Instance(id), ev); !asCode(err, &e, api.CodeUnauthenticated) {
		t.Fatalf("another guest's quote, with its own token: %v", err)
	}
	// Even with this instance's agent's token (stolen), the quote is not
	// signed by this instance's AK.
	if a, err = agent.API.Evidence(ctx, client.Instance(id), ev); err != nil || a.Verdict != "untrusted" ||
		!strings.Contains(strings.Join(a.Reasons, " "), "not signed by the registered attestation key") {
		t.Fatalf("another guest's quote: %+v %v", a, err)
	}
	impostor := &attestor.Agent{TPM: tpm2nd, API: u.agents, Subject: client.Instance(id), EventLog: logPath}
	if err := impostor.Register(ctx); !asCode(err, &e, api.CodeEKMismatch) {
		t.Fatalf("registering with another TPM's EK: %v", err)
	}

	// The webhook got every verdict change, signed, despite its first
	// delivery failing.
	keys, _ = u.c.VerdictKeys(ctx)
	// (learned → trusted; re-registration after the reboot → pending;
	// another kernel → untrusted; the neighbour's quote changes nothing.)
	if got := strings.Join(hook.verdicts(t, keys, 3), ","); got != "trusted,pending,untrusted" {
		t.Fatalf("webhook verdicts: %s", got)
	}

	events, _ := u.c.Events(ctx, id)
	var actions []string
	for _, ev := range events.Items {
		actions = append(actions, ev.Action)
	}
	if s := strings.Join(actions, ","); !strings.Contains(s, "attestation trusted") || !strings.Contains(s, "attestation untrusted") {
		t.Fatalf("events: %s", s)
	}
}

func asCode(err error, e **client.Error, code api.Code) bool {
	return errors.As(err, e) && (*e).Code == code
}

// hookReceiver is a webhook endpoint that refuses its first delivery.
type hookReceiver struct {
	srv    *httptest.Server
	mu     sync.Mutex
	calls  int
	tokens []string
}

func newHookReceiver(t *testing.T) *hookReceiver {
	h := &hookReceiver{}
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.calls++
		if h.calls == 1 {
			http.Error(w, "not yet", http.StatusServiceUnavailable)
			return
		}
		var body api.VerdictToken
		json.NewDecoder(r.Body).Decode(&body)
		h.tokens = append(h.tokens, body.Token)
	}))
	t.Cleanup(h.srv.Close)
	return h
}

// verdictClaim is what the tests read of a delivered verdict token.
type verdictClaim struct{ Verdict, Overall string }

// await waits (up to 30 s) until the tokens delivered so far, each
// verified against keys, satisfy ok, and returns their claims.
func (h *hookReceiver) await(t *testing.T, keys []byte, ok func([]verdictClaim) bool) []verdictClaim {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		h.mu.Lock()
		tokens := append([]string(nil), h.tokens...)
		h.mu.Unlock()
		var out []verdictClaim
		for _, tok := range tokens {
			// A webhook receiver hears about every instance.
			payload, err := attest.VerifyToken(tok, attest.TokenOptions{JWKS: keys, Issuer: attest.TokenIssuer, AnyInstance: true, Now: time.Now()})
			var c verdictClaim
			if err != nil || json.Unmarshal(payload, &c) != nil {
				t.Fatalf("webhook token: %v", err)
			}
			out = append(out, c)
		}
		if ok(out) || time.Now().After(deadline) {
			return out
		}
	}
}

// verdicts waits for at least n deliveries and returns their verdicts.
func (h *hookReceiver) verdicts(t *testing.T, keys []byte, n int) []string {
	t.Helper()
	var out []string
	for _, c := range h.await(t, keys, func(cs []verdictClaim) bool { return len(cs) >= n }) {
		out = append(out, c.Verdict)
	}
	return out
}

// meddle is a proxy in front of vtpmd that calls fn before it forwards an
// activation: a stranger acting between a registration and its activation.
// It returns the proxy's address.
func meddle(t *testing.T, target string, fn func()) string {
	t.Helper()
	proxy := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: target})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/attestation/activate") {
			fn()
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}
