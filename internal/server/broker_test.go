package server

import (
	"bytes"
	"context"
	"crypto"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/keyrelease"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

const (
	instB = "0b5c6b8e-1f0a-4c61-9a1e-5d3b6a7c8d90"
	instC = "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"
)

var bootFirmware = []attesttest.Measurement{{PCR: 0, Type: 0x8, Data: []byte("firmware")}, {PCR: 4, Type: 0x80000003, Data: []byte("kernel")}}

// trustedGuest is a guest of project whose vTPM vtpmd provisioned (its EKs
// certified by the deployment CA), registered, attested and judged
// trusted by a policy learned from its boot.
func trustedGuest(t testing.TB, f *fixture, id, project string) *guest {
	t.Helper()
	swtpmtest.Require(t)
	i := swtpmtest.Instance(t, spec.V20)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ident, err := swtpm.Manufacture(ctx, i, swtpm.ManufactureOptions{Certify: func(_ context.Context, _ swtpm.EKKind, pub crypto.PublicKey) ([]byte, error) {
		return f.deploymentCA.IssueVTPMEK(pub, "2.0")
	}})
	if err != nil {
		t.Fatal(err)
	}
	g := newGuestOf(t, f, id, project, i, ident, bootFirmware)
	if err := g.agent.Register(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := g.agent.Attest(ctx); err != nil {
		t.Fatal(err)
	}
	var a api.Attestation
	if code := f.call(t, "POST", "/v1/vtpms/"+id+"/attestation/policy", "", api.PolicyRequest{Learn: true}, &a); code != 200 || a.Verdict != "trusted" {
		t.Fatalf("learning %s's policy: %d %+v", id, code, a)
	}
	return g
}

// hostVerdict records host h1's own attestation with verdict and fresh
// evidence, through the verifier (so that a change reaches its instances).
func hostVerdict(t testing.TB, f *fixture, verdict store.Verdict, evidenceAt time.Time) {
	t.Helper()
	now := time.Now().UTC()
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		return tx.PutAttestation(&store.Attestation{InstanceID: store.HostKey("h1"), RegisteredAt: now.Add(-time.Hour), EvidenceAt: evidenceAt, Verdict: verdict})
	})
	if err != nil {
		t.Fatal(err)
	}
}

func release(g *guest, id, name string) ([]byte, api.WrappedSecret, error) {
	return keyrelease.Fetch(context.Background(), g.agent, id, name)
}

func wantCode(t *testing.T, what string, err error, status int, code api.Code) {
	t.Helper()
	var e *client.Error
	if !errors.As(err, &e) || e.Status != status || e.Code != code {
		t.Fatalf("%s: %v; want %d %s", what, err, status, code)
	}
}

// events are the actions and details of id's events whose action starts
// with "secret".
func secretEvents(t *testing.T, f *fixture, id string) []string {
	t.Helper()
	var l api.EventList
	f.call(t, "GET", "/v1/vtpms/"+id+"/events", "", nil, &l)
	var out []string
	for _, e := range l.Items {
		if strings.HasPrefix(e.Action, "secret ") {
			out = append(out, e.Action+": "+e.Detail)
		}
	}
	return out
}

// TestBrokerReleaseAndRefusals: a trusted instance on a trusted host gets
// the secret released to it, opened in its own vTPM only; every other
// request is refused with its code, and each release and refusal is an
// event of the instance.
func TestBrokerReleaseAndRefusals(t *testing.T) {
	var logs bytes.Buffer
	f := newFixtureWith(t, setup{log: slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	hostVerdict(t, f, store.VerdictTrusted, time.Now())
	a := trustedGuest(t, f, inst, "p1")
	b := trustedGuest(t, f, instB, "p1")
	c := trustedGuest(t, f, instC, "p2")
	payload := []byte("luks key 0123456789")

	var sec api.BrokerSecret
	if code := f.call(t, "POST", "/v1/broker/secrets", "p1", api.CreateBrokerSecretRequest{Name: "disk", Payload: payload, ReleaseTo: []string{inst}}, &sec); code != 201 ||
		sec.Name != "disk" || sec.Project != "p1" || sec.MaxEvidenceAge != "2m0s" {
		t.Fatalf("create: %d %+v", code, sec)
	}
	var body []byte
	f.call(t, "GET", "/v1/broker/secrets/disk", "p1", nil, &body)
	if bytes.Contains(body, payload) || strings.Contains(string(body), "bHVrcyBrZXk") {
		t.Fatalf("the secret's record shows its payload: %s", body)
	}

	got, ws, err := release(a, inst, "disk")
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("release to the trusted instance: %q %v", got, err)
	}
	if bytes.Contains(ws.Wrapped, payload) {
		t.Fatal("the wrapped answer carries the payload in clear")
	}
	// The answer opens in no other vTPM.
	if ak, _ := b.agent.AK(); true {
		if got, err := keyrelease.Open(b.agent, ak, ws); err == nil || got != nil {
			t.Fatalf("instance B's vTPM opened A's release: %q", got)
		}
	}

	// Another process of the guest (vtpm-guest secret get) uses the
	// running agent's registration: its token, and the same AK made again.
	getter := &attestor.Agent{TPM: a.tpm, API: client.New(f.srv.URL, ""), Subject: client.Instance(inst)}
	if err := getter.Resume(a.agent.Token()); err != nil {
		t.Fatal(err)
	}
	if got, _, err := keyrelease.Fetch(context.Background(), getter, inst, "disk"); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("a second process with the agent's registration: %q %v", got, err)
	}
	getter.Flush()

	// Refusals, each with its code.
	_, _, err = release(b, instB, "disk")
	wantCode(t, "another instance", err, 403, api.CodeReleaseNotAllowed)
	_, _, err = release(c, instC, "disk")
	wantCode(t, "another project's secret", err, 404, api.CodeNotFound)
	_, _, err = release(a, inst, "nope")
	wantCode(t, "no such secret", err, 404, api.CodeNotFound)
	stranger := *a.agent
	stranger.API = client.New(f.srv.URL, "").WithAgentToken("not-the-token")
	_, _, err = keyrelease.Fetch(context.Background(), &stranger, inst, "disk")
	wantCode(t, "a stranger's token", err, 401, api.CodeUnauthenticated)

	// Stale evidence: the host's last evidence is older than the bound
	// (while its verdict still reads trusted).
	hostVerdict(t, f, store.VerdictTrusted, time.Now().Add(-10*time.Minute))
	_, _, err = release(a, inst, "disk")
	wantCode(t, "the host's old evidence", err, 409, api.CodeEvidenceTooOld)
	hostVerdict(t, f, store.VerdictTrusted, time.Now())

	// No registration: an instance of the project that never registered.
	instD := "3c2b1a09-8f7e-4d6c-9b5a-493827160504"
	di, did := swtpmtest.Manufactured(t, spec.V20, nil)
	d := newGuestOf(t, f, instD, "p1", di, did, bootFirmware)
	d.agent.API = d.agent.API.WithAgentToken("x")
	_, err = d.agent.API.ReleaseSecret(context.Background(), instD, "disk")
	wantCode(t, "an instance never registered", err, 409, api.CodeNotRegistered)
	if evs := secretEvents(t, f, instD); len(evs) != 0 {
		t.Errorf("a request nobody proved to be the agent's was recorded: %q", evs)
	}

	// A deleted instance: B's vTPM is being deleted.
	var psec api.BrokerSecret
	f.call(t, "POST", "/v1/broker/secrets", "p1", api.CreateBrokerSecretRequest{Name: "any", Payload: payload, ReleaseTo: []string{inst, instB}}, &psec)
	if _, _, err := release(b, instB, "any"); err != nil {
		t.Fatalf("release to B: %v", err)
	}
	if code := f.call(t, "DELETE", "/v1/vtpms/"+instB, "", nil, nil); code != 202 {
		t.Fatalf("deleting B: %d", code)
	}
	_, _, err = release(b, instB, "any")
	wantCode(t, "a deleted instance", err, 409, api.CodeInstanceDeleted)

	evs := secretEvents(t, f, inst)
	for _, want := range []string{"secret released: disk", "secret refused: nope: not_found", "secret refused: disk: evidence_too_old"} {
		if !slices.ContainsFunc(evs, func(e string) bool { return strings.HasPrefix(e, want) }) {
			t.Errorf("instance A's events %q lack %q", evs, want)
		}
	}
	if slices.ContainsFunc(evs, func(e string) bool { return strings.Contains(e, "unauthenticated") }) {
		t.Errorf("a stranger's request was recorded: %q", evs)
	}
	if evs := secretEvents(t, f, instB); !slices.ContainsFunc(evs, func(e string) bool { return strings.HasPrefix(e, "secret refused: disk: release_not_allowed") }) {
		t.Errorf("instance B's events %q lack the refusal", evs)
	}
	// By policy: any instance of the project judged by the named policy.
	if code := f.call(t, "POST", "/v1/policies", "p1", api.CreatePolicyRequest{Name: "web", LearnFrom: &api.LearnFrom{InstanceID: inst}}, nil); code != 201 {
		t.Fatalf("creating policy web: %d", code)
	}
	if code := f.call(t, "POST", "/v1/broker/secrets", "p1", api.CreateBrokerSecretRequest{Name: "web-key", Payload: payload, Policy: "nope"}, nil); code != 404 {
		t.Fatalf("a secret for a policy that does not exist: %d", code)
	}
	if code := f.call(t, "POST", "/v1/broker/secrets", "p1", api.CreateBrokerSecretRequest{Name: "web-key", Payload: payload, Policy: "web"}, nil); code != 201 {
		t.Fatalf("create web-key: %d", code)
	}
	_, _, err = release(a, inst, "web-key")
	wantCode(t, "an instance not judged by the policy", err, 403, api.CodeReleaseNotAllowed)
	var applied api.Attestation
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/attestation/policy", "", api.PolicyRequest{Policy: "web"}, &applied); code != 200 || applied.Overall != "trusted" {
		t.Fatalf("applying web: %d %+v", code, applied)
	}
	if got, _, err := release(a, inst, "web-key"); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("release by policy: %q %v", got, err)
	}

	var l api.BrokerSecret
	f.call(t, "GET", "/v1/broker/secrets/disk", "p1", nil, &l)
	if len(l.Releases) != 1 || l.Releases[0].InstanceID != inst || !l.Releases[0].RevokedAt.IsZero() || l.Releases[0].Releases != 2 {
		t.Fatalf("releases of disk: %+v", l.Releases)
	}

	// The payload is nowhere but in the answers' wrapping: not in the
	// logs (at debug), not in any event, not in the store's files.
	if !strings.Contains(logs.String(), "secret released") {
		t.Fatalf("the broker logged no release: the check below would see nothing\n%s", logs.String())
	}
	var all []string
	for _, id := range []string{inst, instB, instC, instD} {
		var l api.EventList
		f.call(t, "GET", "/v1/vtpms/"+id+"/events", "", nil, &l)
		for _, e := range l.Items {
			all = append(all, e.Action+": "+e.Detail)
		}
	}
	files := map[string][]byte{}
	filepath.WalkDir(f.dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			files[path], _ = os.ReadFile(path)
		}
		return nil
	})
	if os.Getenv("VTPMD_TEST_STORE") != "postgres" && len(files) == 0 {
		t.Fatal("no store files to look in")
	}
	files["logs"], files["events"] = logs.Bytes(), []byte(strings.Join(all, "\n"))
	for where, b := range files {
		for _, form := range [][]byte{payload, []byte(base64.RawStdEncoding.EncodeToString(payload)), []byte(hex.EncodeToString(payload))} {
			if bytes.Contains(b, form) {
				t.Errorf("the payload (%.12s…) is in %s", form, where)
			}
		}
	}
}

// TestBrokerRevokesWhenTheHostTurnsStale: a host whose evidence stops
// coming (stale, as the verifier's sweep records it) revokes what its
// instances hold: an event, the agent's long poll names the secret (once),
// and later requests are refused until the host is trusted again.
func TestBrokerRevokesWhenTheHostTurnsStale(t *testing.T) {
	f := newFixture(t)
	hostVerdict(t, f, store.VerdictTrusted, time.Now())
	a := trustedGuest(t, f, inst, "p1")
	if code := f.call(t, "POST", "/v1/broker/secrets", "p1", api.CreateBrokerSecretRequest{Name: "disk", Payload: []byte("k"), ReleaseTo: []string{inst}}, nil); code != 201 {
		t.Fatalf("create: %d", code)
	}
	if _, _, err := release(a, inst, "disk"); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	err := f.store.Update(ctx, func(tx *store.Tx) error {
		h, err := tx.GetAttestation(store.HostKey("h1"))
		if err != nil {
			return err
		}
		h.StaleAt = time.Now().Add(-time.Second)
		return tx.PutAttestation(h)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.api.Verifier.MarkStale(ctx); err != nil {
		t.Fatal(err)
	}

	r, err := a.agent.API.AwaitRefresh(ctx, client.Instance(inst), time.Second)
	if err != nil || !r.Requested || !slices.Equal(r.Revoked, []string{"disk"}) {
		t.Fatalf("the agent's long poll: %+v %v; want disk revoked", r, err)
	}
	if r, _ := a.agent.API.AwaitRefresh(ctx, client.Instance(inst), 10*time.Millisecond); len(r.Revoked) != 0 {
		t.Fatalf("the revocation was told twice: %+v", r)
	}
	if evs := secretEvents(t, f, inst); !slices.ContainsFunc(evs, func(e string) bool {
		return strings.HasPrefix(e, "secret revoked: disk: VM trusted, but host h1 is stale")
	}) {
		t.Fatalf("events %q lack the revocation", evs)
	}
	var sec api.BrokerSecret
	f.call(t, "GET", "/v1/broker/secrets/disk", "p1", nil, &sec)
	if len(sec.Releases) != 1 || sec.Releases[0].RevokedAt.IsZero() || !strings.Contains(sec.Releases[0].Reason, "host h1 is stale") {
		t.Fatalf("the release after the host turned stale: %+v", sec.Releases)
	}
	_, _, err = release(a, inst, "disk")
	wantCode(t, "while the host is stale", err, 403, api.CodeNotTrusted)

	hostVerdict(t, f, store.VerdictTrusted, time.Now())
	if _, _, err := release(a, inst, "disk"); err != nil {
		t.Fatalf("once the host is trusted again: %v", err)
	}
	var again api.BrokerSecret
	f.call(t, "GET", "/v1/broker/secrets/disk", "p1", nil, &again)
	if len(again.Releases) != 1 || !again.Releases[0].RevokedAt.IsZero() || again.Releases[0].Releases != 2 {
		t.Fatalf("the release once trusted again: %+v", again.Releases)
	}
}
