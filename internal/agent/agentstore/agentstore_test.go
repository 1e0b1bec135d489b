package agentstore_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	pgtest.Stop()
	os.Exit(code)
}

// onEngines runs test on a fresh SQLite store and a fresh PostgreSQL one.
func onEngines(t *testing.T, test func(t *testing.T, st *store.Store)) {
	ctx := context.Background()
	t.Run("sqlite", func(t *testing.T) {
		st, err := store.Open(ctx, filepath.Join(t.TempDir(), "vtpmd.db"), store.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		test(t, st)
	})
	t.Run("postgres", func(t *testing.T) {
		st, err := store.OpenPostgres(ctx, pgtest.DSN(t), store.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		test(t, st)
	})
}

const (
	id1 = "0c0c0c0c-0000-4000-8000-000000000001"
	id2 = "0c0c0c0c-0000-4000-8000-000000000002"
	id3 = "0c0c0c0c-0000-4000-8000-000000000003"
)

// fixture is a store's and a key manager's records for agents.
type fixture struct {
	st   *store.Store
	kr   keyring.Keyring
	recs *agentstore.Records
}

func newFixture(t *testing.T, st *store.Store) *fixture {
	t.Helper()
	kr, err := embedded.Open(t.Context(), st, filepath.Join(t.TempDir(), "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{st: st, kr: kr, recs: agentstore.New(st, kr, nil, nil)}
}

// create records a vTPM with a secret as the API does.
func (f *fixture) create(t *testing.T, id, host string) *store.VTPM {
	t.Helper()
	ctx := context.Background()
	sid, err := f.kr.Create(ctx, "p1", "", []byte("secret of "+id))
	if err != nil {
		t.Fatal(err)
	}
	v := &store.VTPM{InstanceID: id, Project: "p1", Host: host, Domain: "guest-" + id[len(id)-1:],
		Spec:    spec.Spec{Version: spec.V20, Model: spec.CRB, SecretSecurity: spec.User},
		Desired: store.DesiredRunning, Phase: store.PhasePending, SecretID: sid}
	if err := f.st.Update(ctx, func(tx *store.Tx) error { return tx.CreateVTPM(v) }); err != nil {
		t.Fatal(err)
	}
	return v
}

// desire sets what is asked of id, as the API does.
func (f *fixture) desire(t *testing.T, id string, d store.Desired) {
	t.Helper()
	err := f.st.Update(context.Background(), func(tx *store.Tx) error {
		v, err := tx.GetVTPM(id)
		if err != nil {
			return err
		}
		v.Desired = d
		return tx.UpdateVTPM(v)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// get reads id's record as an agent does.
func (f *fixture) get(t *testing.T, id string) *agent.Record {
	t.Helper()
	r, err := f.recs.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func read(t *testing.T, st *store.Store, id string) (*store.VTPM, []store.Event) {
	t.Helper()
	var v *store.VTPM
	var evs []store.Event
	err := st.View(context.Background(), func(tx *store.Tx) (err error) {
		if v, err = tx.GetVTPM(id); err != nil {
			return err
		}
		evs, err = tx.ListEvents(id, v.Incarnation)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return v, evs
}

// TestRecords: the agent's records over the store say the same as the
// store, watch only the host's vTPMs, keep what the agent observed (phase,
// EKs, the sockets it serves the vTPM on), write only an unchanged record (a
// stale one is agent.ErrConflict, one of a deleted or replaced vTPM
// agent.ErrNotFound, with the store's error kept in the chain), and
// delete a vTPM asked to be deleted with its attestation, its secret and a
// last event of its own.
func TestRecords(t *testing.T) {
	onEngines(t, func(t *testing.T, st *store.Store) {
		ctx := context.Background()
		f := newFixture(t, st)
		recs := f.recs
		h := agent.Host{Name: "h1", Traits: []string{spec.TraitTPM20}, Capacity: 7, Backend: "swtpm"}
		if err := recs.RegisterHost(ctx, h); err != nil {
			t.Fatal(err)
		}
		var got *store.Host
		if err := st.View(ctx, func(tx *store.Tx) (err error) { got, err = tx.GetHost("h1"); return err }); err != nil {
			t.Fatal(err)
		}
		if got.Name != h.Name || !reflect.DeepEqual(got.Traits, h.Traits) || got.Capacity != h.Capacity || got.Backend != h.Backend {
			t.Fatalf("registered %+v, want %+v", got, h)
		}

		if err := recs.RegisterHost(ctx, agent.Host{Name: "h2", Capacity: 1, Backend: "swtpm"}); err != nil {
			t.Fatal(err)
		}
		row2 := f.create(t, id2, "h1")
		row1 := f.create(t, id1, "h1")
		f.create(t, id3, "h2")
		ch, err := recs.Watch(ctx, "h1", 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		list := ch.Records
		slices.SortFunc(list, func(a, b *agent.Record) int { return strings.Compare(a.InstanceID, b.InstanceID) })
		if !ch.Reset || len(list) != 2 || list[0].InstanceID != id1 || list[1].InstanceID != id2 {
			t.Fatalf("h1's records: %+v", ch)
		}
		want := agent.Record{InstanceID: id1, Incarnation: row1.Incarnation, Project: "p1", Spec: row1.Spec, Host: "h1",
			Domain: row1.Domain, Desired: agent.DesiredRunning, Phase: agent.PhasePending, SecretID: row1.SecretID, Generation: 1}
		if !reflect.DeepEqual(*list[0], want) {
			t.Fatalf("record\n%+v, want\n%+v", *list[0], want)
		}

		r := list[0]
		stale := *r
		eks := []agent.EK{{Kind: "rsa2048", Handle: 0x81010001, NVIndex: 0x01c00002, PublicDER: []byte{1, 2}, CertDER: []byte{3}},
			{Kind: "ecc-nist-p256", Handle: 0x81010002, PublicDER: []byte{4}}}
		sockets := api.Sockets{Data: "/run/vtpmd/" + id1 + "/tpm.sock", Ctrl: "/run/vtpmd/" + id1 + "/tpm.sock.ctrl"}
		r.Phase, r.EKs, r.Sockets = agent.PhaseActive, eks, sockets
		if err := recs.Update(ctx, r, agent.Event{Actor: "agent:h1", Action: "manufactured and started", Detail: "active"}); err != nil {
			t.Fatal(err)
		}
		if r.Generation != 2 {
			t.Errorf("generation after an update: %d, want 2", r.Generation)
		}
		now, evs := read(t, st, id1)
		if now.Phase != store.PhaseActive || now.Generation != 2 || len(now.EKs) != 2 || now.EKs[0].Handle != 0x81010001 ||
			string(now.EKs[1].PublicDER) != "\x04" || now.Domain != row1.Domain || now.SecretID != row1.SecretID ||
			now.Sockets != (store.Sockets{Data: sockets.Data, Ctrl: sockets.Ctrl}) {
			t.Fatalf("after the update: %+v", now)
		}
		if e := evs[len(evs)-1]; e.Actor != "agent:h1" || e.Action != "manufactured and started" || e.Detail != "active" {
			t.Fatalf("last event %+v", e)
		}
		if again, err := recs.Get(ctx, id1); err != nil || !reflect.DeepEqual(again, r) {
			t.Fatalf("read back\n%+v %v, want\n%+v", again, err, r)
		}

		stale.Phase = agent.PhaseError
		err = recs.Update(ctx, &stale, agent.Event{Actor: "agent:h1", Action: "error"})
		if !errors.Is(err, agent.ErrConflict) || !errors.Is(err, store.ErrConflict) {
			t.Fatalf("a stale update: %v, want agent.ErrConflict wrapping store.ErrConflict", err)
		}
		if stale.Generation != 1 {
			t.Errorf("a refused update moved the generation to %d", stale.Generation)
		}
		if now, _ := read(t, st, id1); now.Phase != store.PhaseActive || now.Generation != 2 {
			t.Fatalf("a stale update wrote: %+v", now)
		}

		// A vTPM deleted and made again under the same instance id is
		// another vTPM: the old one's record is gone.
		old := f.get(t, id2)
		err = st.Update(ctx, func(tx *store.Tx) error { return tx.DeleteVTPM(id2) })
		if err != nil {
			t.Fatal(err)
		}
		if _, err := recs.Get(ctx, id2); !errors.Is(err, agent.ErrNotFound) || !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("reading a deleted vTPM: %v, want agent.ErrNotFound", err)
		}
		f.create(t, id2, "h1")
		old.Phase = agent.PhaseProvisioning
		if err := recs.Update(ctx, old, agent.Event{Actor: "agent:h1", Action: "provisioning"}); !errors.Is(err, agent.ErrNotFound) {
			t.Fatalf("updating a replaced vTPM: %v, want agent.ErrNotFound", err)
		}
		if now, _ := read(t, st, id2); now.Incarnation == row2.Incarnation || now.Phase != store.PhasePending {
			t.Fatalf("the new vTPM after the old one's update: %+v", now)
		}

		// Only a vTPM asked to be deleted can be.
		var re *refusal.Error
		if err := recs.Delete(ctx, f.get(t, id1), agent.Event{Actor: "agent:h1", Action: "deleted"}); !errors.As(err, &re) || re.Kind != refusal.KindConflict {
			t.Fatalf("deleting a vTPM still wanted: %v", err)
		}
		err = st.Update(ctx, func(tx *store.Tx) error {
			return tx.PutAttestation(&store.Attestation{InstanceID: id1, Verdict: "trusted"})
		})
		if err != nil {
			t.Fatal(err)
		}
		f.desire(t, id1, store.DesiredDeleted)
		doomed := f.get(t, id1)
		if err := recs.Delete(ctx, doomed, agent.Event{Actor: "agent:h1", Action: "deleted", Detail: "state and secret destroyed"}); err != nil {
			t.Fatal(err)
		}
		var evs1 []store.Event
		err = st.View(ctx, func(tx *store.Tx) error {
			if _, err := tx.GetVTPM(id1); !errors.Is(err, store.ErrNotFound) {
				t.Errorf("the record after Delete: %v", err)
			}
			if _, err := tx.GetAttestation(id1); !errors.Is(err, store.ErrNotFound) {
				t.Errorf("the attestation after Delete: %v", err)
			}
			evs1, err = tx.ListEvents(id1, row1.Incarnation)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if e := evs1[len(evs1)-1]; e.Action != "deleted" || e.Actor != "agent:h1" || e.Incarnation != row1.Incarnation {
			t.Fatalf("the deleted vTPM's last event: %+v", e)
		}
		if _, err := f.kr.Get(ctx, row1.SecretID); !errors.Is(err, keyring.ErrNotFound) {
			t.Fatalf("the deleted vTPM's secret: %v, want shredded", err)
		}
		if err := recs.Delete(ctx, doomed, agent.Event{Actor: "agent:h1", Action: "deleted"}); !errors.Is(err, agent.ErrNotFound) {
			t.Fatalf("deleting again: %v, want agent.ErrNotFound", err)
		}
	})
}

// TestUpdateTakesOnlyObserved: an agent's update writes only what an agent
// observes; what was asked (desired state, project, spec, secret) stays
// the API's whatever the agent sends, recorded EKs never change, a phase
// no agent reports is refused, and so is another host's agent (with an
// event naming it).
func TestUpdateTakesOnlyObserved(t *testing.T) {
	onEngines(t, func(t *testing.T, st *store.Store) {
		ctx := context.Background()
		f := newFixture(t, st)
		if err := f.recs.RegisterHost(ctx, agent.Host{Name: "h1", Capacity: 7, Backend: "swtpm"}); err != nil {
			t.Fatal(err)
		}
		row := f.create(t, id1, "h1")
		r := f.get(t, id1)
		r.Desired, r.Project, r.SecretID, r.Spec.Version, r.Domain = agent.DesiredDeleted, "p2", "other", spec.V12, "evil"
		r.Phase, r.EKs = agent.PhaseActive, []agent.EK{{Kind: "rsa2048", Handle: 0x81010001, PublicDER: []byte{1}}}
		if err := f.recs.Update(ctx, r, agent.Event{Actor: "agent:h1", Action: "started"}); err != nil {
			t.Fatal(err)
		}
		now, _ := read(t, st, id1)
		if now.Desired != store.DesiredRunning || now.Project != "p1" || now.Host != "h1" || now.SecretID != row.SecretID ||
			now.Spec.Version != spec.V20 || now.Domain != row.Domain || now.Phase != store.PhaseActive || len(now.EKs) != 1 {
			t.Fatalf("after an update that tried to change what was asked: %+v", now)
		}
		var re *refusal.Error
		r = f.get(t, id1)
		r.EKs[0].PublicDER = []byte{2}
		if err := f.recs.Update(ctx, r, agent.Event{Actor: "agent:h1", Action: "started"}); !errors.As(err, &re) || re.Kind != refusal.KindInvalid {
			t.Fatalf("changing a recorded EK: %v, want refused", err)
		}
		r = f.get(t, id1)
		r.Phase = "dancing"
		if err := f.recs.Update(ctx, r, agent.Event{Actor: "agent:h1", Action: "started"}); !errors.As(err, &re) || re.Code != api.CodeInvalidParameter {
			t.Fatalf("an unknown phase: %v, want refused", err)
		}
		r = f.get(t, id1)
		r.Host = "h9"
		if err := f.recs.Update(ctx, r, agent.Event{Actor: "agent:h9", Action: "started"}); !errors.As(err, &re) || re.Kind != refusal.KindForbidden {
			t.Fatalf("another host's update: %v, want refused", err)
		}
		after, evs := read(t, st, id1)
		if after.Generation != now.Generation {
			t.Fatalf("a refused update wrote: generation %d → %d", now.Generation, after.Generation)
		}
		if e := evs[len(evs)-1]; e.Actor != "host:h9" || e.Action != "refused" {
			t.Fatalf("the last event after another host's update: %+v", e)
		}
	})
}

// TestSecretAndRekey: a vTPM's secret is released while it is to run (or,
// with secret security host, while a resize of it is being reverted);
// rekeying a vTPM not yet manufactured stores the new secret for its
// project, points the record at it and shreds the old one; once its EKs
// are recorded it is refused, and no secret of the refusal is left.
func TestSecretAndRekey(t *testing.T) {
	onEngines(t, func(t *testing.T, st *store.Store) {
		ctx := context.Background()
		f := newFixture(t, st)
		if err := f.recs.RegisterHost(ctx, agent.Host{Name: "h1", Capacity: 7, Backend: "swtpm"}); err != nil {
			t.Fatal(err)
		}
		row := f.create(t, id1, "h1")
		r := f.get(t, id1)
		if got, err := f.recs.Secret(ctx, r); err != nil || string(got) != "secret of "+id1 {
			t.Fatalf("secret: %q %v", got, err)
		}
		if err := f.recs.Rekey(ctx, r, []byte("pooled"), agent.Event{Actor: "agent:h1", Action: "adopted a pre-manufactured TPM"}); err != nil {
			t.Fatal(err)
		}
		if r.SecretID == row.SecretID || r.Generation != 2 {
			t.Fatalf("after a rekey: %+v", r)
		}
		if s, err := f.kr.Get(ctx, r.SecretID); err != nil || string(s.Payload) != "pooled" || s.Project != "p1" {
			t.Fatalf("the new secret: %+v %v", s, err)
		}
		if _, err := f.kr.Get(ctx, row.SecretID); !errors.Is(err, keyring.ErrNotFound) {
			t.Fatalf("the old secret after a rekey: %v, want shredded", err)
		}
		if got, err := f.recs.Secret(ctx, r); err != nil || string(got) != "pooled" {
			t.Fatalf("secret after rekey: %q %v", got, err)
		}
		r.Phase, r.EKs = agent.PhaseActive, []agent.EK{{Kind: "rsa2048", Handle: 0x81010001, PublicDER: []byte{1}}}
		if err := f.recs.Update(ctx, r, agent.Event{Actor: "agent:h1", Action: "started"}); err != nil {
			t.Fatal(err)
		}
		before, err := f.kr.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var re *refusal.Error
		if err := f.recs.Rekey(ctx, r, []byte("again"), agent.Event{Actor: "agent:h1"}); !errors.As(err, &re) || re.Kind != refusal.KindConflict {
			t.Fatalf("rekeying a manufactured vTPM: %v, want refused", err)
		}
		if after, _ := f.kr.List(ctx); len(after) != len(before) {
			t.Fatalf("a refused rekey left secrets: %d before, %d after", len(before), len(after))
		}
		f.desire(t, id1, store.DesiredStopped)
		if _, err := f.recs.Secret(ctx, f.get(t, id1)); !errors.As(err, &re) || re.Kind != refusal.KindConflict {
			t.Fatalf("the secret of a stopped vTPM: %v, want refused", err)
		}
		// A stopped vTPM's resize being reverted: the old TPM's secret goes
		// back to its host's hypervisor with secret security host alone.
		for _, ss := range []spec.SecretSecurity{spec.User, spec.HostMode} {
			err := st.Update(ctx, func(tx *store.Tx) error {
				v, err := tx.GetVTPM(id1)
				if err != nil {
					return err
				}
				v.Spec.SecretSecurity = ss
				v.Resize = &store.Resize{Status: store.ResizeReverting, Kind: spec.ResizeNewTPM, From: &v.Spec, To: &v.Spec}
				return tx.UpdateVTPM(v)
			})
			if err != nil {
				t.Fatal(err)
			}
			got, err := f.recs.Secret(ctx, f.get(t, id1))
			switch {
			case ss == spec.HostMode && (err != nil || string(got) != "pooled"):
				t.Fatalf("the secret of a stopped host vTPM whose resize is reverted: %q %v", got, err)
			case ss != spec.HostMode && !errors.As(err, &re):
				t.Fatalf("the secret of a stopped %s vTPM whose resize is reverted: %v, want refused", ss, err)
			}
		}
	})
}

// TestWatch: a watch from a revision returns only what changed since, and
// waits for the next commit on its host when nothing has; Placed refuses a
// host another host's vTPM, and logs it as the vTPM's event.
func TestWatch(t *testing.T) {
	onEngines(t, func(t *testing.T, st *store.Store) {
		ctx := context.Background()
		f := newFixture(t, st)
		for _, h := range []string{"h1", "h2"} {
			if err := f.recs.RegisterHost(ctx, agent.Host{Name: h, Capacity: 7, Backend: "swtpm"}); err != nil {
				t.Fatal(err)
			}
		}
		f.create(t, id1, "h1")
		f.create(t, id2, "h1")
		ch, err := f.recs.Watch(ctx, "h1", 0, 0)
		if err != nil || len(ch.Records) != 2 {
			t.Fatalf("first watch: %+v %v", ch, err)
		}
		done := make(chan *agent.Changes)
		go func() {
			next, err := f.recs.Watch(ctx, "h1", ch.Revision, time.Minute)
			if err != nil {
				t.Error(err)
			}
			done <- next
		}()
		f.create(t, id3, "h2") // another host's: does not answer the watch
		f.desire(t, id2, store.DesiredStopped)
		next := <-done
		if next.Reset || len(next.Records) != 1 || next.Records[0].InstanceID != id2 || next.Records[0].Desired != agent.DesiredStopped {
			t.Fatalf("the watch after one change: %+v", next)
		}
		if empty, err := f.recs.Watch(ctx, "h1", next.Revision, 0); err != nil || len(empty.Records)+len(empty.Gone) != 0 || empty.Revision != next.Revision {
			t.Fatalf("a watch with nothing new: %+v %v", empty, err)
		}

		var re *refusal.Error
		if _, err := f.recs.Placed(ctx, "h2", id1); !errors.As(err, &re) || re.Kind != refusal.KindForbidden {
			t.Fatalf("h2 asking for h1's vTPM: %v, want forbidden", err)
		}
		_, evs := read(t, st, id1)
		if e := evs[len(evs)-1]; e.Actor != "host:h2" || e.Action != "refused" || !strings.Contains(e.Detail, "h1") {
			t.Fatalf("the refusal's event: %+v", e)
		}
		if r, err := f.recs.Placed(ctx, "h1", id1); err != nil || r.InstanceID != id1 {
			t.Fatalf("h1 asking for its own vTPM: %+v %v", r, err)
		}
	})
}

// TestWatchEmptyHost: a host that never had a vTPM is at revision 0, and
// its watcher asks from 0 every time; the watch waits for the host's first
// vTPM rather than answering at once with nothing (which had the agent of
// a new host read the store in a loop).
func TestWatchEmptyHost(t *testing.T) {
	onEngines(t, func(t *testing.T, st *store.Store) {
		ctx := context.Background()
		f := newFixture(t, st)
		if err := f.recs.RegisterHost(ctx, agent.Host{Name: "h1", Capacity: 7, Backend: "swtpm"}); err != nil {
			t.Fatal(err)
		}
		if ch, err := f.recs.Watch(ctx, "h1", 0, 0); err != nil || !ch.Reset || len(ch.Records) != 0 || ch.Revision != 0 {
			t.Fatalf("the first look at an empty host: %+v %v", ch, err)
		}
		done := make(chan *agent.Changes)
		go func() {
			ch, err := f.recs.Watch(ctx, "h1", 0, time.Minute)
			if err != nil {
				t.Error(err)
			}
			done <- ch
		}()
		time.Sleep(100 * time.Millisecond) // the watch is waiting, or (wrongly) answered
		f.create(t, id1, "h1")
		if ch := <-done; len(ch.Records) != 1 || ch.Records[0].InstanceID != id1 || ch.Revision == 0 {
			t.Fatalf("the watch of an empty host, answered: %+v", ch)
		}
	})
}

// TestHeartbeats: registering records a heartbeat with the agent's
// version; each heartbeat moves the host's last heartbeat to the store's
// now and its version, and nothing else; a host never registered has
// none (agent.ErrNotFound).
func TestHeartbeats(t *testing.T) {
	onEngines(t, func(t *testing.T, st *store.Store) {
		ctx := context.Background()
		recs := newFixture(t, st).recs
		get := func() *store.Host {
			t.Helper()
			var h *store.Host
			if err := st.View(ctx, func(tx *store.Tx) (err error) { h, err = tx.GetHost("h1"); return err }); err != nil {
				t.Fatal(err)
			}
			return h
		}
		if err := recs.RegisterHost(ctx, agent.Host{Name: "h1", Traits: []string{spec.TraitTPM20}, Capacity: 7, Backend: "swtpm", Version: "v1.0.0"}); err != nil {
			t.Fatal(err)
		}
		last := get()
		if last.Version != "v1.0.0" || last.HeartbeatAt.IsZero() {
			t.Fatalf("registered: %+v", last)
		}
		for _, version := range []string{"v1.0.0", "v1.1.0"} {
			if err := recs.Heartbeat(ctx, agent.Heartbeat{Host: "h1", Version: version}); err != nil {
				t.Fatal(err)
			}
			h := get()
			if !h.HeartbeatAt.After(last.HeartbeatAt) || h.Version != version || h.Capacity != 7 || !reflect.DeepEqual(h.Traits, last.Traits) {
				t.Fatalf("after a heartbeat of %s: %+v (before: %+v)", version, h, last)
			}
			last = h
		}
		err := recs.Heartbeat(ctx, agent.Heartbeat{Host: "h2", Version: "v1.0.0"})
		if !errors.Is(err, agent.ErrNotFound) || !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("a heartbeat of a host never registered: %v, want agent.ErrNotFound", err)
		}
	})
}

// TestAgentStatements: what acting on a new vTPM costs the store, counted
// (not timed), so that a change that reads again what it wrote shows: a
// watch from nothing is two statements (the host's revision and drift
// request, then its records), a report one checked write with its
// revision, event and (PostgreSQL) notification, a secret one read.
func TestAgentStatements(t *testing.T) {
	onEngines(t, func(t *testing.T, st *store.Store) {
		ctx := context.Background()
		f := newFixture(t, st)
		if err := f.recs.RegisterHost(ctx, agent.Host{Name: "h1", Capacity: 7, Backend: "swtpm"}); err != nil {
			t.Fatal(err)
		}
		f.create(t, id1, "h1")
		report := 4 // revision, write, event, notification
		if t.Name() == "TestAgentStatements/sqlite" {
			report = 3
		}
		count := func(what string, want int, do func() error) {
			t.Helper()
			before := st.Statements()
			if err := do(); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			if n := st.Statements() - before; n != int64(want) {
				t.Errorf("%s: %d statements, want %d", what, n, want)
			}
		}
		var r *agent.Record
		count("a watch from nothing", 2, func() error {
			ch, err := f.recs.Watch(ctx, "h1", 0, 0)
			if err == nil {
				r = ch.Records[0]
			}
			return err
		})
		r.Phase = agent.PhaseProvisioning
		count("a report", report, func() error { return f.recs.Update(ctx, r, agent.Event{Actor: "agent:h1", Action: "provisioning"}) })
		// The record's check, then the key manager's sealed key (the
		// embedded key manager keeps its secrets in the store).
		count("a secret", 2, func() error { _, err := f.recs.Secret(ctx, r); return err })
		r.Phase = agent.PhaseActive
		count("a report", report, func() error { return f.recs.Update(ctx, r, agent.Event{Actor: "agent:h1", Action: "started"}) })
	})
}

// TestLiveMigrationInputs: the steps of a live migration release the
// vTPM's secret to its target alone, while preparing, and its record to
// the host of each step only at that step: a prepare by the source, a
// send by the target or before sending, a settle before the record names
// the target, an abort by the host the record names are refused; the
// Incoming the target answered reaches the source with the send, which
// reads cancelled while a cancel is asked of the source.
func TestLiveMigrationInputs(t *testing.T) {
	onEngines(t, func(t *testing.T, st *store.Store) {
		ctx := context.Background()
		f := newFixture(t, st)
		for _, h := range []string{"h1", "h2"} {
			if err := f.recs.RegisterHost(ctx, agent.Host{Name: h, Capacity: 7, Backend: "libvirt"}); err != nil {
				t.Fatal(err)
			}
		}
		v := f.create(t, id1, "h1")
		m := &store.Migration{InstanceID: id1, Incarnation: v.Incarnation, Source: "h1", Target: "h2", Live: true, Step: store.MigrationPreparing, WasRunning: true}
		if err := st.Update(ctx, func(tx *store.Tx) error { return tx.StartMigration(m) }); err != nil {
			t.Fatal(err)
		}
		ask := func(host, kind string, bundle []byte) (*agent.TransferInput, error) {
			x := &store.Transfer{Host: host, InstanceID: id1, Incarnation: v.Incarnation, Kind: kind, Bundle: bundle}
			if err := st.Update(ctx, func(tx *store.Tx) error { return tx.AskTransfer(x) }); err != nil {
				t.Fatal(err)
			}
			return f.recs.TransferInput(ctx, host, agent.TransferAsk{ID: x.ID})
		}
		advance := func(step store.MigrationStep, host string) {
			err := st.Update(ctx, func(tx *store.Tx) error {
				from := m.Step
				m.Step = step
				if err := tx.AdvanceMigration(m, from); err != nil {
					return err
				}
				r, err := tx.GetVTPM(id1)
				if err != nil {
					return err
				}
				r.Host = host
				return tx.UpdateVTPM(r)
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		refused := func(host, kind string) {
			t.Helper()
			var re *refusal.Error
			if in, err := ask(host, kind, nil); !errors.As(err, &re) || re.Code != api.CodeForbidden {
				t.Fatalf("%s by %s at step %s: %+v %v, want forbidden", kind, host, m.Step, in, err)
			}
		}

		in, err := ask("h2", store.TransferPrepare, nil)
		if err != nil || string(in.Secret) != "secret of "+id1 || in.Record == nil || in.Record.Domain != v.Domain {
			t.Fatalf("prepare by the target: %+v %v", in, err)
		}
		refused("h1", store.TransferPrepare)
		refused("h1", store.TransferSend)
		refused("h2", store.TransferSettle)

		advance(store.MigrationSending, "h1")
		in, err = ask("h1", store.TransferSend, []byte(`{"uri":"qemu+tcp://h2/system"}`))
		if err != nil || in.Secret != nil || string(in.Bundle) != `{"uri":"qemu+tcp://h2/system"}` || in.Record == nil || in.Cancel {
			t.Fatalf("send by the source: %+v %v", in, err)
		}
		// The send's input says it is cancelled while a cancel is asked of
		// the source, and only then.
		send := &store.Transfer{Host: "h1", InstanceID: id1, Incarnation: v.Incarnation, Kind: store.TransferSend}
		cancelled := func() bool {
			t.Helper()
			in, err := f.recs.TransferInput(ctx, "h1", agent.TransferAsk{ID: send.ID})
			if err != nil {
				t.Fatal(err)
			}
			return in.Cancel
		}
		var cancels []*store.Transfer
		for _, host := range []string{"h2", "h1"} {
			c := &store.Transfer{Host: host, InstanceID: id1, Incarnation: v.Incarnation, Kind: store.TransferCancel}
			cancels = append(cancels, c)
			if err := st.Update(ctx, func(tx *store.Tx) error {
				if send.ID == "" {
					if err := tx.AskTransfer(send); err != nil {
						return err
					}
				}
				return tx.AskTransfer(c)
			}); err != nil {
				t.Fatal(err)
			}
			if got, want := cancelled(), host == "h1"; got != want {
				t.Fatalf("a cancel asked of %s: the source's send reads cancelled %v, want %v", host, got, want)
			}
		}
		if err := st.Update(ctx, func(tx *store.Tx) error { return tx.WithdrawTransfer(cancels[1].ID) }); err != nil {
			t.Fatal(err)
		}
		if cancelled() {
			t.Fatal("the cancel withdrawn, the source's send still reads cancelled")
		}
		refused("h2", store.TransferSend)
		refused("h2", store.TransferPrepare)
		if in, err := ask("h2", store.TransferAbort, nil); err != nil || in.Secret != nil || in.Record == nil {
			t.Fatalf("abort by the target: %+v %v", in, err)
		}
		refused("h1", store.TransferAbort)

		advance(store.MigrationCleaning, "h2")
		if in, err := ask("h2", store.TransferSettle, nil); err != nil || in.Secret != nil || in.Record == nil {
			t.Fatalf("settle by the target: %+v %v", in, err)
		}
		refused("h1", store.TransferSettle)
		refused("h2", store.TransferAbort)
	})
}
