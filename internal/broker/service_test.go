package broker

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/bearer"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/keyrelease"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/secrets"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
	"github.com/vtpmd/vtpmd/internal/tenant"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
)

func TestMain(m *testing.M) { os.Exit(storetest.Main(m)) }

// The embedded key manager gives a release its payload in the release's
// transaction.
var _ storeKeyring = (*embedded.Keyring)(nil)

const (
	inst  = "7d7a0c4e-8f4b-4bd2-9d6e-2b8f4f3c1a10" // p1's, trusted once it attests
	other = "0b5c6b8e-1f0a-4c61-9a1e-5d3b6a7c8d90" // p1's, its EK certified by no one vtpmd trusts
	bare  = "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b" // p1's, never registered
)

// clock is a test's time, moved by hand.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *clock) advance(d time.Duration) { c.mu.Lock(); defer c.mu.Unlock(); c.now = c.now.Add(d) }

// fixture is the broker on a real store (storetest: SQLite, or PostgreSQL
// with VTPMD_TEST_STORE=postgres), the embedded key manager and a real
// verifier, whose evidence comes from a software TPM's quotes
// (attesttest): on host h1 (trusted, attested), project p1's instances
// inst and other (registered, each with an RSA EK, inst's certified by the
// deployment CA, other's by another CA) and bare (never registered).
type fixture struct {
	b     *Service
	v     *verifier.Verifier
	store *store.Store
	clock *clock
	ak    *rsa.PrivateKey
	quote uint64 // the software TPM's clock
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx := context.Background()
	st := storetest.Open(t)
	kr, err := embedded.Open(ctx, st, filepath.Join(t.TempDir(), "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{store: st, clock: &clock{now: time.Now().UTC()}}
	deployment, err := ca.New(ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := ca.New(ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if f.ak, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		t.Fatal(err)
	}
	err = st.Update(ctx, func(tx *store.Tx) error {
		if err := tx.PutHost(&store.Host{Name: "h1", Traits: []string{}, Capacity: 8, Backend: "swtpm"}); err != nil {
			return err
		}
		for id, issuer := range map[string]*ca.CA{inst: deployment, other: stranger, bare: deployment} {
			if err := tx.CreateVTPM(&store.VTPM{InstanceID: id, Project: "p1", Spec: spec.Spec{Version: spec.V20, Model: spec.TIS},
				Host: "h1", Desired: store.DesiredRunning, Phase: store.PhaseActive, SecretID: id, EKs: []store.EK{ek(t, issuer)}}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	vs := vtpms.New(vtpms.Config{Store: st, Keyring: kr, Secrets: secrets.New(st, kr, nil)})
	f.v = verifier.New(verifier.Config{Store: st, VTPMs: vs, CAChainPEM: deployment.ChainPEM, Now: f.clock.Now})
	f.b = New(Config{Store: st, Keyring: kr, Verifier: f.v, Now: f.clock.Now})
	f.host(t, store.VerdictTrusted, f.clock.Now())
	for _, id := range []string{inst, other} {
		f.register(t, id)
		if st := f.attest(t, id, good); st.Overall != store.VerdictTrusted && id == inst {
			t.Fatalf("%s after good evidence: %s (%s)", id, st.Overall, st.Summary)
		}
	}
	return f
}

// ek is an RSA EK certified by issuer.
func ek(t *testing.T, issuer *ca.CA) store.EK {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := issuer.IssueVTPMEK(&key.PublicKey, "2.0")
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return store.EK{Kind: "rsa2048", Handle: 0x81010001, PublicDER: der, CertDER: cert}
}

// host records h1's own attestation: verdict, its last evidence at.
func (f *fixture) host(t *testing.T, verdict store.Verdict, evidenceAt time.Time) {
	t.Helper()
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		return tx.PutAttestation(&store.Attestation{InstanceID: store.HostKey("h1"), RegisteredAt: evidenceAt, EvidenceAt: evidenceAt, Verdict: verdict})
	})
	if err != nil {
		t.Fatal(err)
	}
}

// token is the bearer token of instance id's registered agent.
func token(id string) string { return "agent " + id }

// The software TPM's boots: good is the one the policy learned.
var (
	good = []attesttest.Measurement{{PCR: 0, Type: 8, Data: []byte("firmware")}, {PCR: 4, Type: 0x80000003, Data: []byte("kernel")}}
	evil = []attesttest.Measurement{{PCR: 0, Type: 8, Data: []byte("firmware")}, {PCR: 4, Type: 0x80000003, Data: []byte("another kernel")}}
)

// register records instance id as registered by its agent (the AK, the
// token), with a policy of good's PCRs.
func (f *fixture) register(t *testing.T, id string) {
	t.Helper()
	_, pcrs := attesttest.EventLog(good)
	policy := map[int][]byte{0: pcrs[0], 4: pcrs[4]}
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		return tx.PutAttestation(&store.Attestation{InstanceID: id, EKKind: "rsa2048", RegisteredAt: f.clock.Now(), Verdict: store.VerdictPending,
			AKPublic: attesttest.AKPublic(attest.RSAAKTemplate, f.ak), AgentTokenHash: bearer.Hash(token(id)), PolicyPCRs: policy})
	})
	if err != nil {
		t.Fatal(err)
	}
}

// attest has instance id's agent send evidence of boot through the
// verifier, which judges it (and revokes what a verdict other than
// trusted takes back).
func (f *fixture) attest(t *testing.T, id string, boot []attesttest.Measurement) verifier.Status {
	t.Helper()
	ctx := context.Background()
	sub, err := f.v.Instance(ctx, tenant.Caller{}, id)
	if err != nil {
		t.Fatal(err)
	}
	n, err := f.v.Nonce(ctx, sub, token(id))
	if err != nil {
		t.Fatal(err)
	}
	log, pcrs := attesttest.EventLog(boot)
	f.quote += 1000
	quote, sig, err := attesttest.Quote(f.ak, n.Nonce, pcrs, f.quote)
	if err != nil {
		t.Fatal(err)
	}
	st, err := f.v.Evidence(ctx, sub, token(id), api.EvidenceRequest{Nonce: n.Nonce, Attest: quote, Signature: sig, PCRs: pcrs, EventLog: log})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// create stores project's secret of req.
func (f *fixture) create(t *testing.T, project string, req api.CreateBrokerSecretRequest) {
	t.Helper()
	if _, err := f.b.Create(context.Background(), tenant.Caller{Project: project}, req); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) release(id, agentToken, name string) (api.WrappedSecret, error) {
	return f.b.Release(context.Background(), tenant.Caller{Actor: "attestation agent"}, id, agentToken, name)
}

// events counts instance id's events of action.
func (f *fixture) events(t *testing.T, id, action string) (n int) {
	t.Helper()
	var evs []store.Event
	if err := f.store.View(context.Background(), func(tx *store.Tx) (err error) { evs, err = tx.ListAllEvents(id); return err }); err != nil {
		t.Fatal(err)
	}
	for _, e := range evs {
		if e.Action == action {
			n++
		}
	}
	return n
}

// releases reads p1's secret name's releases, by instance.
func (f *fixture) releases(t *testing.T, name string) map[string]store.Release {
	t.Helper()
	_, rs, err := f.b.Get(context.Background(), tenant.Caller{Project: "p1"}, "", name)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]store.Release{}
	for _, r := range rs {
		out[r.InstanceID] = r
	}
	return out
}

func code(err error) api.Code {
	var re *refusal.Error
	if errors.As(err, &re) {
		return re.Code
	}
	return ""
}

var payload = []byte("the disk's key, 32 bytes long!!!")

// A release to a trusted instance on a trusted host: wrapped for its
// vTPM's EK and AK, bound to the instance's vTPM, the secret and the
// release, and recorded (the release, counted, and an event each time).
func TestRelease(t *testing.T) {
	f := newFixture(t)
	f.create(t, "p1", api.CreateBrokerSecretRequest{Name: "disk", Payload: payload, ReleaseTo: []string{inst}})
	var incarnation string
	f.store.View(context.Background(), func(tx *store.Tx) error {
		vt, err := tx.GetVTPM(inst)
		incarnation = vt.Incarnation
		return err
	})
	var ids []string
	for range 2 {
		out, err := f.release(inst, token(inst), "disk")
		if err != nil {
			t.Fatal(err)
		}
		if out.Name != "disk" || out.InstanceID != inst || out.EKHandle != "0x81010001" || slices.Contains(ids, out.ReleaseID) {
			t.Fatalf("released %+v", out)
		}
		ids = append(ids, out.ReleaseID)
		w, err := keyrelease.Parse(out.Wrapped)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(w.Binding, keyrelease.Binding(inst, incarnation, "disk", out.ReleaseID)) {
			t.Fatalf("binding %q", w.Binding)
		}
		if bytes.Contains(out.Wrapped, payload) {
			t.Fatal("the payload in the clear in the answer")
		}
	}
	if r := f.releases(t, "disk")[inst]; r.Releases != 2 || !r.RevokedAt.IsZero() || r.Incarnation != incarnation {
		t.Fatalf("release record %+v", r)
	}
	if n := f.events(t, inst, "secret released"); n != 2 {
		t.Fatalf("%d release events, want 2", n)
	}
}

// Each release condition, and each refusal's stable code: a caller that
// is not the instance's registered agent is refused with nothing written;
// a refusal after that is an event of the instance, and no release.
func TestReleaseRefusals(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.create(t, "p1", api.CreateBrokerSecretRequest{Name: "disk", Payload: payload, ReleaseTo: []string{inst, other}, MaxEvidenceAge: "1m"})
	f.create(t, "p1", api.CreateBrokerSecretRequest{Name: "elsewhere", Payload: payload, ReleaseTo: []string{bare}})
	f.create(t, "p2", api.CreateBrokerSecretRequest{Name: "theirs", Payload: payload, ReleaseTo: []string{inst}})
	if _, err := f.v.CreatePolicy(ctx, tenant.Caller{Project: "p1"}, api.CreatePolicyRequest{Name: "gold", PCRs: map[int]string{0: strings.Repeat("ab", 32)}}); err != nil {
		t.Fatal(err)
	}
	f.create(t, "p1", api.CreateBrokerSecretRequest{Name: "gold-only", Payload: payload, Policy: "gold"})

	for _, c := range []struct {
		name, id, token, secret string
		caller                  tenant.Caller
		code                    api.Code
		recorded                bool // a refusal event of the instance
	}{
		{"not the agent", inst, "agent of someone else", "disk", tenant.Caller{}, api.CodeUnauthenticated, false},
		{"no token", inst, "", "disk", tenant.Caller{}, api.CodeUnauthenticated, false},
		{"never registered", bare, token(bare), "elsewhere", tenant.Caller{}, api.CodeNotRegistered, false},
		{"not an instance id", "i-1", token(inst), "disk", tenant.Caller{}, api.CodeInvalidInstanceID, false},
		{"no secret of that name", inst, token(inst), "nothing", tenant.Caller{}, api.CodeNotFound, true},
		{"another project's secret", inst, token(inst), "theirs", tenant.Caller{}, api.CodeNotFound, true},
		{"for other instances", inst, token(inst), "elsewhere", tenant.Caller{}, api.CodeReleaseNotAllowed, true},
		{"for another policy's instances", inst, token(inst), "gold-only", tenant.Caller{}, api.CodeReleaseNotAllowed, true},
		{"a vTPM vtpmd did not provision", other, token(other), "disk", tenant.Caller{}, api.CodeNotTrusted, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := f.events(t, c.id, "secret refused")
			_, err := f.b.Release(ctx, c.caller, c.id, c.token, c.secret)
			if code(err) != c.code {
				t.Fatalf("refused with %v, want %s", err, c.code)
			}
			if got := f.events(t, c.id, "secret refused") - before; got != map[bool]int{true: 1, false: 0}[c.recorded] {
				t.Fatalf("%d refusal events, want recorded %v", got, c.recorded)
			}
		})
	}
	// An instance of no vTPM, or of another project than the caller's,
	// is not found.
	if _, err := f.b.Release(ctx, tenant.Caller{}, "3c2b1a09-8f7e-4d6c-9b5a-493827160504", token(inst), "disk"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("an instance with no vTPM: %v", err)
	}
	if _, err := f.b.Release(ctx, tenant.Caller{Project: "p2"}, inst, token(inst), "disk"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("an instance of another project: %v", err)
	}
	if err := f.store.Update(ctx, func(tx *store.Tx) error {
		return tx.PutAttestation(&store.Attestation{InstanceID: bare, Verdict: store.VerdictPending})
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.release(bare, token(bare), "elsewhere"); code(err) != api.CodeNotRegistered {
		t.Fatalf("a record that never finished registering: %v", err)
	}

	// Evidence older than the secret allows: the instance's, then its
	// host's (both still trusted: not stale yet).
	f.clock.advance(90 * time.Second)
	_, err := f.release(inst, token(inst), "disk")
	if code(err) != api.CodeEvidenceTooOld || !strings.Contains(err.Error(), "instance's") {
		t.Fatalf("the instance's evidence 90s old: %v", err)
	}
	f.attest(t, inst, good)
	f.host(t, store.VerdictTrusted, f.clock.Now().Add(-2*time.Minute))
	if _, err := f.release(inst, token(inst), "disk"); code(err) != api.CodeEvidenceTooOld || !strings.Contains(err.Error(), "host's") {
		t.Fatalf("the host's evidence 2m old: %v", err)
	}
	f.host(t, store.VerdictTrusted, f.clock.Now())
	if _, err := f.release(inst, token(inst), "disk"); err != nil {
		t.Fatalf("with fresh evidence again: %v", err)
	}

	// A host that is not trusted, or does not attest at all.
	f.host(t, store.VerdictUntrusted, f.clock.Now())
	if _, err := f.release(inst, token(inst), "disk"); code(err) != api.CodeNotTrusted || !strings.Contains(err.Error(), "host h1") {
		t.Fatalf("on an untrusted host: %v", err)
	}
	if err := f.store.Update(ctx, func(tx *store.Tx) error { return tx.DeleteAttestation(store.HostKey("h1")) }); err != nil {
		t.Fatal(err)
	}
	if _, err := f.release(inst, token(inst), "disk"); code(err) != api.CodeNotTrusted || !strings.Contains(err.Error(), "does not attest") {
		t.Fatalf("on a host that does not attest: %v", err)
	}
	f.host(t, store.VerdictTrusted, f.clock.Now())

	// An instance being deleted.
	if err := f.store.Update(ctx, func(tx *store.Tx) error {
		vt, err := tx.GetVTPM(inst)
		if err != nil {
			return err
		}
		vt.Desired = store.DesiredDeleted
		return tx.UpdateVTPM(vt)
	}); err != nil {
		t.Fatal(err)
	}
	before := f.events(t, inst, "secret refused")
	if _, err := f.release(inst, token(inst), "disk"); code(err) != api.CodeInstanceDeleted || f.events(t, inst, "secret refused") != before+1 {
		t.Fatalf("an instance being deleted: %v", err)
	}
	if r := f.releases(t, "disk"); len(r) != 1 || r[inst].Releases != 1 {
		t.Fatalf("releases after the refusals: %+v, want the one", r)
	}
}

// A secret made for a named policy goes to instances judged by that
// policy, by identity: once the policy is deleted and made again under its
// name (the same values even), instances judged by the new one are refused
// until the secret is made again.
func TestReleaseByPolicyIdentity(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	p1 := tenant.Caller{Project: "p1"}
	_, pcrs := attesttest.EventLog(good)
	gold := api.CreatePolicyRequest{Name: "gold", PCRs: map[int]string{0: hex.EncodeToString(pcrs[0]), 4: hex.EncodeToString(pcrs[4])}}
	judged := func() {
		t.Helper()
		sub, err := f.v.Instance(ctx, p1, inst)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.v.SetPolicy(ctx, sub, api.PolicyRequest{Policy: "gold"}); err != nil {
			t.Fatal(err)
		}
		if st := f.attest(t, inst, good); st.Overall != store.VerdictTrusted || st.Policy != "gold" {
			t.Fatalf("judged by gold: %s (%s), policy %q", st.Overall, st.Summary, st.Policy)
		}
	}
	if _, err := f.v.CreatePolicy(ctx, p1, gold); err != nil {
		t.Fatal(err)
	}
	judged()
	f.create(t, "p1", api.CreateBrokerSecretRequest{Name: "gold-disk", Payload: payload, Policy: "gold"})
	if _, err := f.release(inst, token(inst), "gold-disk"); err != nil {
		t.Fatalf("an instance judged by the secret's policy: %v", err)
	}

	if err := f.v.DeletePolicy(ctx, p1, "p1", "gold"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.v.CreatePolicy(ctx, p1, gold); err != nil {
		t.Fatal(err)
	}
	judged()
	_, err := f.release(inst, token(inst), "gold-disk")
	if code(err) != api.CodeReleaseNotAllowed || !strings.Contains(err.Error(), "made again") {
		t.Fatalf("an instance judged by a policy made again under the name: %v", err)
	}
	f.create(t, "p1", api.CreateBrokerSecretRequest{Name: "gold-disk-2", Payload: payload, Policy: "gold"})
	if _, err := f.release(inst, token(inst), "gold-disk-2"); err != nil {
		t.Fatalf("a secret made again for the new policy: %v", err)
	}
}

// A verdict change that leaves an instance other than trusted revokes its
// releases in the same transaction (the record, an event, and a word for
// its agent's long poll); it is refused until trusted again, and a new
// release then holds again. Its own evidence turning untrusted, going
// stale, and its host's registration being forgotten each revoke.
func TestRevocation(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.create(t, "p1", api.CreateBrokerSecretRequest{Name: "disk", Payload: payload, ReleaseTo: []string{inst}})
	f.create(t, "p1", api.CreateBrokerSecretRequest{Name: "boot", Payload: payload, ReleaseTo: []string{inst}})
	revoked := func(why string, turn func()) {
		t.Helper()
		for _, name := range []string{"disk", "boot"} {
			if _, err := f.release(inst, token(inst), name); err != nil {
				t.Fatalf("before %s: %v", why, err)
			}
		}
		events := f.events(t, inst, "secret revoked")
		turn()
		for _, name := range []string{"disk", "boot"} {
			if r := f.releases(t, name)[inst]; r.RevokedAt.IsZero() || r.Reason == "" {
				t.Fatalf("%s: release of %s %+v, want revoked", why, name, r)
			}
		}
		if n := f.events(t, inst, "secret revoked") - events; n != 2 {
			t.Fatalf("%s: %d revocation events, want 2", why, n)
		}
		var told []string
		if err := f.store.Update(ctx, func(tx *store.Tx) (err error) { told, err = tx.TakeRevocations(inst); return err }); err != nil {
			t.Fatal(err)
		}
		if slices.Sort(told); !slices.Equal(told, []string{"boot", "disk"}) {
			t.Fatalf("%s: the agent is told of %v", why, told)
		}
		if _, err := f.release(inst, token(inst), "disk"); code(err) != api.CodeNotTrusted {
			t.Fatalf("%s: a release after it: %v", why, err)
		}
	}

	revoked("another boot", func() {
		if st := f.attest(t, inst, evil); st.Overall != store.VerdictUntrusted {
			t.Fatalf("after another boot: %s", st.Overall)
		}
	})
	f.attest(t, inst, good)
	revoked("stale evidence", func() {
		f.clock.advance(verifier.DefaultStaleAfter + time.Minute)
		f.host(t, store.VerdictTrusted, f.clock.Now())
		if err := f.v.MarkStale(ctx); err != nil {
			t.Fatal(err)
		}
	})
	f.attest(t, inst, good)
	revoked("the host forgotten", func() {
		sub, err := f.v.Host(ctx, tenant.Caller{}, "h1")
		if err != nil {
			t.Fatal(err)
		}
		if err := f.v.Forget(ctx, sub); err != nil {
			t.Fatal(err)
		}
	})
	f.host(t, store.VerdictTrusted, f.clock.Now())
	out, err := f.release(inst, token(inst), "disk")
	if err != nil {
		t.Fatalf("trusted again: %v", err)
	}
	if r := f.releases(t, "disk")[inst]; !r.RevokedAt.IsZero() || r.Reason != "" || out.ReleaseID == "" {
		t.Fatalf("a release once trusted again: %+v", r)
	}
}

// A deleted secret is released no more, and its payload is gone from the
// key manager.
func TestDeletedSecret(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	f.create(t, "p1", api.CreateBrokerSecretRequest{Name: "disk", Payload: payload, ReleaseTo: []string{inst}})
	sec, _, err := f.b.Get(ctx, tenant.Caller{Project: "p1"}, "", "disk")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.release(inst, token(inst), "disk"); err != nil {
		t.Fatal(err)
	}
	if err := f.b.Delete(ctx, tenant.Caller{Project: "p1"}, "", "disk"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.release(inst, token(inst), "disk"); code(err) != api.CodeNotFound {
		t.Fatalf("a deleted secret: %v", err)
	}
	err = f.store.View(ctx, func(tx *store.Tx) error { _, err := f.b.cfg.Keyring.(storeKeyring).GetIn(tx, sec.KeyID); return err })
	if err == nil {
		t.Fatal("the deleted secret's payload is still in the key manager")
	}
}
