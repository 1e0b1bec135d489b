package verifier

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/secrets"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
	"github.com/vtpmd/vtpmd/internal/tenant"
	"github.com/vtpmd/vtpmd/internal/vtpms"
	"github.com/vtpmd/vtpmd/internal/webhook"
)

func TestMain(m *testing.M) { os.Exit(storetest.Main(m)) }

const inst = "7d7a0c4e-8f4b-4bd2-9d6e-2b8f4f3c1a10"

// clock is a test's time, moved by hand.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// fixture is a verifier on a real store, its clock in the test's hands,
// with host h1 and project p1's vTPM of instance inst on it (no EKs).
type fixture struct {
	v     *Verifier
	store *store.Store
	clock *clock
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	return fixtureOn(t, storetest.Open(t))
}

// fixtureOn is newFixture on st.
func fixtureOn(t *testing.T, st *store.Store) *fixture {
	t.Helper()
	kr, err := embedded.Open(context.Background(), st, filepath.Join(t.TempDir(), "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	err = st.Update(context.Background(), func(tx *store.Tx) error {
		if err := tx.PutHost(&store.Host{Name: "h1", Traits: []string{}, Capacity: 2, Backend: "swtpm"}); err != nil {
			return err
		}
		return tx.CreateVTPM(&store.VTPM{InstanceID: inst, Project: "p1", Spec: spec.Spec{Version: spec.V20, Model: spec.TIS},
			Host: "h1", Desired: store.DesiredRunning, Phase: store.PhaseActive, SecretID: inst})
	})
	if err != nil {
		t.Fatal(err)
	}
	c := &clock{now: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	vs := vtpms.New(vtpms.Config{Store: st, Keyring: kr, Secrets: secrets.New(st, kr, nil)})
	return &fixture{v: New(Config{Store: st, VTPMs: vs, Now: c.Now}), store: st, clock: c}
}

var operator = tenant.Caller{Actor: "api:operator (test)"}

func (f *fixture) instance(t *testing.T) Subject {
	t.Helper()
	sub, err := f.v.Instance(context.Background(), operator, inst)
	if err != nil {
		t.Fatal(err)
	}
	return sub
}

// put writes a as inst's record, with the deadline the verifier gives it.
func (f *fixture) put(t *testing.T, a *store.Attestation) {
	t.Helper()
	a.InstanceID, a.StaleAt = inst, f.v.staleAt(a)
	if err := f.store.Update(context.Background(), func(tx *store.Tx) error { return tx.PutAttestation(a) }); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) events(t *testing.T, action string) (n int) {
	t.Helper()
	var evs []store.Event
	f.store.View(context.Background(), func(tx *store.Tx) (err error) { evs, err = tx.ListAllEvents(inst); return err })
	for _, e := range evs {
		if e.Action == action {
			n++
		}
	}
	return n
}

// A registered instance whose evidence is overdue reads stale at once, as
// the verifier's clock says; MarkStale records it, once, as an event (and
// a webhook).
func TestStale(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	now := f.clock.Now()
	f.put(t, &store.Attestation{RegisteredAt: now.Add(-time.Hour), EvidenceAt: now, Verdict: store.VerdictTrusted})
	sub := f.instance(t)

	f.clock.advance(DefaultStaleAfter - time.Second)
	if st, err := f.v.Status(ctx, sub); err != nil || st.Verdict != store.VerdictTrusted || st.State != Registered {
		t.Fatalf("before the deadline: %+v %v", st, err)
	}
	if err := f.v.MarkStale(ctx); err != nil || f.events(t, "attestation stale") != 0 {
		t.Fatalf("MarkStale before the deadline: %v, %d events", err, f.events(t, "attestation stale"))
	}
	f.clock.advance(time.Second)
	st, err := f.v.Status(ctx, sub)
	if err != nil || st.Verdict != store.VerdictStale || !strings.Contains(st.Reasons[0], "was trusted") {
		t.Fatalf("at the deadline: %+v %v", st, err)
	}
	if st.Overall != store.VerdictStale {
		t.Fatalf("overall of a stale VM: %s", st.Overall)
	}
	for range 2 {
		if err := f.v.MarkStale(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.events(t, "attestation stale"); n != 1 {
		t.Fatalf("%d stale events after MarkStale twice, want 1", n)
	}
	var a *store.Attestation
	f.store.View(ctx, func(tx *store.Tx) (err error) { a, err = tx.GetAttestation(inst); return err })
	if a.Verdict != store.VerdictStale || !a.StaleAt.IsZero() {
		t.Fatalf("recorded: %+v", a)
	}
	a.Verdict, a.ChallengeHash, a.RegisteredAt = store.VerdictPending, []byte{1}, time.Time{} // registering again: no deadline
	if at := f.v.staleAt(a); !at.IsZero() {
		t.Fatalf("a challenged registration has deadline %v", at)
	}
}

// Two servers on one database, sweeping at once: one sweeps (it holds
// the sweep's lease, round after round), the other does not, and the
// overdue verdict turns stale once, one event and one webhook. When the
// sweeping one stops renewing, the other takes over once the lease runs
// out.
func TestStaleSweptOnce(t *testing.T) {
	storetest.OnEngines(t, func(t *testing.T, open func() *store.Store) {
		ctx := context.Background()
		f := fixtureOn(t, open())
		now := f.clock.Now()
		f.put(t, &store.Attestation{RegisteredAt: now.Add(-time.Hour), EvidenceAt: now, Verdict: store.VerdictTrusted})
		f.clock.advance(DefaultStaleAfter)

		var replicas []*Verifier
		for i, st := range []*store.Store{f.store, open()} {
			hook := webhook.New(webhook.Config{URL: "http://127.0.0.1:9/", Store: st}) // not started: the outbox keeps what it is told
			replicas = append(replicas, New(Config{Store: st, VTPMs: f.v.cfg.VTPMs, Now: f.clock.Now, Webhook: hook, Replica: fmt.Sprintf("replica-%d", i)}))
		}
		const rounds = 10
		swept := make([]int, len(replicas))
		var wg sync.WaitGroup
		for i, v := range replicas {
			wg.Go(func() {
				for range rounds {
					ok, err := v.sweepStale(ctx, time.Hour)
					if err != nil {
						t.Error(err)
					}
					if ok {
						swept[i]++
					}
				}
			})
		}
		wg.Wait()
		holder, other := replicas[0], replicas[1]
		if swept[1] > 0 {
			holder, other = other, holder
		}
		if swept[0]+swept[1] != rounds || swept[0]*swept[1] != 0 {
			t.Fatalf("the replicas swept %v times in %d rounds each; want one of them every round, the other never", swept, rounds)
		}
		var outbox []store.Delivery
		f.store.View(ctx, func(tx *store.Tx) (err error) { outbox, err = tx.Deliveries(10); return err })
		if n := f.events(t, "attestation stale"); n != 1 || len(outbox) != 1 {
			t.Fatalf("%d stale events, %d webhooks; want one each", n, len(outbox))
		}

		// The holder renews for a moment, then stops: the other takes over.
		if ok, err := holder.sweepStale(ctx, 100*time.Millisecond); !ok || err != nil {
			t.Fatalf("the holder's last round: %v %v", ok, err)
		}
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			ok, err := other.sweepStale(ctx, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the other replica never took the sweep over")
			}
		}
		if ok, err := holder.sweepStale(ctx, time.Hour); ok || err != nil {
			t.Fatalf("the old holder swept again after the other took over: %v %v", ok, err)
		}
	})
}

// The overall answer takes the VM's verdict first, then its vTPM's
// provenance, then its host's; a vTPM whose EK certificate is not the
// deployment CA's is never trusted.
func TestOverallAnswer(t *testing.T) {
	ok := api.Provisioning{Verified: true}
	host := func(v store.Verdict, rs ...string) HostVerdict {
		return HostVerdict{Name: "h1", Verdict: v, Reasons: rs}
	}
	for _, c := range []struct {
		vm      store.Verdict
		host    HostVerdict
		prov    api.Provisioning
		want    store.Verdict
		summary string
	}{
		{store.VerdictTrusted, host(store.VerdictTrusted), ok, store.VerdictTrusted, "VM trusted on trusted host h1"},
		{store.VerdictUntrusted, host(store.VerdictTrusted), ok, store.VerdictUntrusted, "the VM is untrusted: PCR 9 differs"},
		{store.VerdictPending, host(store.VerdictUntrusted), ok, store.VerdictPending, "the VM is pending: PCR 9 differs"},
		{store.VerdictTrusted, host(store.VerdictUntrusted, "PCR 4 differs"), ok, store.VerdictUntrusted, "VM trusted, but host h1 is untrusted: PCR 4 differs"},
		{store.VerdictTrusted, host(store.VerdictUnattested), ok, store.VerdictUntrusted, "VM trusted, but host h1 does not attest: its integrity is unknown"},
		{store.VerdictTrusted, host(store.VerdictStale, "no evidence"), ok, store.VerdictStale, "VM trusted, but host h1 is stale: no evidence"},
		{store.VerdictTrusted, host(store.VerdictTrusted), api.Provisioning{Reason: "x509: unknown authority"}, store.VerdictUntrusted,
			"VM trusted, but its vTPM is not one vtpmd provisioned: x509: unknown authority"},
	} {
		got, summary := overall(c.vm, []string{"PCR 9 differs"}, c.host, c.prov)
		if got != c.want || summary != c.summary {
			t.Errorf("overall(%s, host %s, verified %v) = %s %q, want %s %q", c.vm, c.host.Verdict, c.prov.Verified, got, summary, c.want, c.summary)
		}
	}

	v := New(Config{CAChainPEM: func() []byte { return nil }})
	p := v.Provisioning(&store.VTPM{Host: "h1", EKs: []store.EK{{Kind: "rsa2048", CertDER: []byte("junk")}}})
	if p.Verified || p.Reason != "the rsa2048 EK has no readable certificate" || p.Host != "h1" {
		t.Fatalf("provisioning with a junk certificate: %+v", p)
	}
	if p := v.Provisioning(&store.VTPM{Host: "h1"}); p.Verified {
		t.Fatalf("provisioning without EKs: %+v", p)
	}
}

// One code may be two kinds of refusal: reading the attestation of an
// instance that never registered is not found; asking for its nonce, a
// conflict. A project asking for a host's is forbidden. Refusals write
// nothing.
func TestRefusalKinds(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	sub := f.instance(t)
	is := func(err error, kind refusal.Kind, code api.Code) bool {
		var r *refusal.Error
		return errors.As(err, &r) && r.Kind == kind && r.Code == code
	}
	if _, err := f.v.Status(ctx, sub); !is(err, refusal.KindNotFound, api.CodeNotRegistered) {
		t.Errorf("status of an unregistered instance: %v", err)
	}
	if _, err := f.v.Nonce(ctx, sub, "token"); !is(err, refusal.KindConflict, api.CodeNotRegistered) {
		t.Errorf("nonce of an unregistered instance: %v", err)
	}
	if _, err := f.v.Host(ctx, tenant.Caller{Project: "p1"}, "h1"); !is(err, refusal.KindForbidden, api.CodeForbidden) {
		t.Errorf("a project asking for a host's attestation: %v", err)
	}
	if _, err := f.v.Instance(ctx, tenant.Caller{Project: "p2"}, inst); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("another project's instance: %v", err)
	}
	if _, err := f.v.Status(ctx, sub); !is(err, refusal.KindNotFound, api.CodeNotRegistered) {
		t.Errorf("the refused nonce left a record: %v", err)
	}
}

// A judgement keeps the policy's mismatches, structured, for the caller:
// the PCR, how it fails, and the values; the recorded reasons say the same
// in words.
func TestJudgementKeepsMismatches(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	log, pcrs := attesttest.EventLog([]attesttest.Measurement{{PCR: 0, Type: 8, Data: []byte("firmware")}, {PCR: 4, Type: 0x80000003, Data: []byte("kernel")}})
	now := f.clock.Now()
	f.put(t, &store.Attestation{RegisteredAt: now, EvidenceAt: now, Verdict: store.VerdictPending, PCRs: pcrs, EventLog: log})
	zero := strings.Repeat("00", 32)
	if _, err := f.v.CreatePolicy(ctx, operator, api.CreatePolicyRequest{Name: "golden", PCRs: map[int]string{0: zero}}); err != nil {
		t.Fatal(err)
	}
	st, err := f.v.SetPolicy(ctx, f.instance(t), api.PolicyRequest{Policy: "golden"})
	if err != nil || st.Verdict != store.VerdictUntrusted || st.Policy != "golden" || !slices.Equal(st.PolicyPCRs, []int{0}) {
		t.Fatalf("applying golden: %+v %v", st, err)
	}
	if len(st.Mismatches) != 1 {
		t.Fatalf("mismatches: %+v", st.Mismatches)
	}
	m := st.Mismatches[0]
	if m.PCR != 0 || m.Kind != attest.ValueDiffers || string(m.Got) != string(pcrs[0]) || len(m.Want) != 32 || st.Reasons[0] != m.String() {
		t.Fatalf("mismatch %+v, reasons %q", m, st.Reasons)
	}
	st, err = f.v.SetPolicy(ctx, f.instance(t), api.PolicyRequest{Learn: true})
	if err != nil || st.Verdict != store.VerdictTrusted || st.Mismatches != nil {
		t.Fatalf("learning this boot: %+v %v", st, err)
	}
	if st, err = f.v.Status(ctx, f.instance(t)); err != nil || st.Mismatches != nil || st.Verdict != store.VerdictTrusted {
		t.Fatalf("a read: %+v %v", st, err)
	}
}

// A verdict change that leaves an instance untrusted revokes the secrets
// released to it, in the change's transaction: the release is marked, an
// event says why, the webhook's claims name the secret, and the agent's
// long poll is woken with it, told once.
func TestVerdictChangeRevokesReleases(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	hook := webhook.New(webhook.Config{URL: "http://127.0.0.1:9/", Store: f.store}) // not started: the outbox keeps it
	f.v = New(Config{Store: f.store, VTPMs: f.v.cfg.VTPMs, Now: f.clock.Now, Webhook: hook})
	now := f.clock.Now()
	f.put(t, &store.Attestation{RegisteredAt: now.Add(-time.Hour), EvidenceAt: now, Verdict: store.VerdictTrusted, AgentTokenHash: bearer.Hash("tok")})
	err := f.store.Update(ctx, func(tx *store.Tx) error { return tx.RecordRelease("p1", "disk", inst, "") })
	if err != nil {
		t.Fatal(err)
	}
	f.clock.advance(DefaultStaleAfter)
	if err := f.v.MarkStale(ctx); err != nil {
		t.Fatal(err)
	}
	var rs []store.Release
	var outbox []store.Delivery
	f.store.View(ctx, func(tx *store.Tx) (err error) {
		if rs, err = tx.ListReleases("p1", "disk"); err != nil {
			return err
		}
		outbox, err = tx.Deliveries(10)
		return err
	})
	if len(rs) != 1 || rs[0].RevokedAt.IsZero() || !strings.HasPrefix(rs[0].Reason, "the VM is stale") {
		t.Fatalf("the release after the VM turned stale: %+v", rs)
	}
	if f.events(t, "secret revoked") != 1 {
		t.Fatal("no event of the revocation")
	}
	var claims map[string]any
	if len(outbox) != 1 || json.Unmarshal(outbox[0].Payload, &claims) != nil || fmt.Sprint(claims["secrets_revoked"]) != "[disk]" {
		t.Fatalf("the webhook of the change: %d deliveries, claims %v", len(outbox), claims)
	}
	r, err := f.v.AwaitRefresh(ctx, f.instance(t), "tok", nil)
	if err != nil || !r.Requested || len(r.Revoked) != 1 || r.Revoked[0] != "disk" {
		t.Fatalf("the agent's long poll: %+v %v", r, err)
	}
	stop := make(chan struct{})
	close(stop)
	if r, err := f.v.AwaitRefresh(ctx, f.instance(t), "tok", stop); err != nil || r.Requested || len(r.Revoked) != 0 {
		t.Fatalf("told again: %+v %v", r, err)
	}
}
