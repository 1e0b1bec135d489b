package agentstore_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
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

// create records a vTPM as the API does.
func create(t *testing.T, st *store.Store, id, host string) *store.VTPM {
	t.Helper()
	v := &store.VTPM{InstanceID: id, Project: "p1", Host: host, Domain: "guest-" + id[len(id)-1:],
		Spec:    spec.Spec{Version: spec.V20, Model: spec.CRB, SecretSecurity: spec.User},
		Desired: store.DesiredRunning, Phase: store.PhasePending, SecretID: "5e5e5e5e-0000-4000-8000-0000000000" + id[len(id)-2:]}
	if err := st.Update(context.Background(), func(tx *store.Tx) error { return tx.CreateVTPM(v) }); err != nil {
		t.Fatal(err)
	}
	return v
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
// store, list only the host's vTPMs, keep what the agent observed (phase,
// EKs, the sockets it serves the vTPM on), write only an unchanged record (a
// stale one is agent.ErrConflict, one of a deleted or replaced vTPM
// agent.ErrNotFound, with the store's error kept in the chain), and
// delete a vTPM with its attestation and a last event of its own.
func TestRecords(t *testing.T) {
	onEngines(t, func(t *testing.T, st *store.Store) {
		ctx := context.Background()
		recs := agentstore.New(st)
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
		row2 := create(t, st, id2, "h1")
		row1 := create(t, st, id1, "h1")
		create(t, st, id3, "h2")
		list, err := recs.List(ctx, "h1")
		if err != nil {
			t.Fatal(err)
		}
		if len(list) != 2 || list[0].InstanceID != id1 || list[1].InstanceID != id2 {
			t.Fatalf("h1's records: %+v", list)
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
		old, err := recs.Get(ctx, id2)
		if err != nil {
			t.Fatal(err)
		}
		err = st.Update(ctx, func(tx *store.Tx) error { return tx.DeleteVTPM(id2) })
		if err != nil {
			t.Fatal(err)
		}
		if _, err := recs.Get(ctx, id2); !errors.Is(err, agent.ErrNotFound) || !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("reading a deleted vTPM: %v, want agent.ErrNotFound", err)
		}
		create(t, st, id2, "h1")
		old.Phase = agent.PhaseProvisioning
		if err := recs.Update(ctx, old, agent.Event{Actor: "agent:h1", Action: "provisioning"}); !errors.Is(err, agent.ErrNotFound) {
			t.Fatalf("updating a replaced vTPM: %v, want agent.ErrNotFound", err)
		}
		if now, _ := read(t, st, id2); now.Incarnation == row2.Incarnation || now.Phase != store.PhasePending {
			t.Fatalf("the new vTPM after the old one's update: %+v", now)
		}

		err = st.Update(ctx, func(tx *store.Tx) error {
			return tx.PutAttestation(&store.Attestation{InstanceID: id1, Verdict: "trusted"})
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := recs.Delete(ctx, id1, agent.Event{Actor: "agent:h1", Action: "deleted", Detail: "state and secret destroyed"}); err != nil {
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
		if err := recs.Delete(ctx, id1, agent.Event{Actor: "agent:h1", Action: "deleted"}); !errors.Is(err, agent.ErrNotFound) {
			t.Fatalf("deleting again: %v, want agent.ErrNotFound", err)
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
		recs := agentstore.New(st)
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
