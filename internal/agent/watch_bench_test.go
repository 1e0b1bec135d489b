package agent_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
	"github.com/vtpmd/vtpmd/internal/agent/agenttest"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
)

// BenchmarkAgentWatch is the agent's end of a change on a host of 10 or
// 1,000 vTPMs: per op, one vTPM's desired state flips (running ⇄
// stopped) in the store, and the op ends when the running agent has
// acted on it and recorded the phase. The agent runs on agentstore with a
// load generator's backend (agenttest.RecordingBackend) on the store
// storetest opens (SQLite; VTPMD_TEST_STORE=postgres for PostgreSQL).
// Its periodic pass over every vTPM is pushed out of the run (Interval),
// so what is measured is the watch path alone. Besides the time it reports
// backend calls, Records calls (heartbeats aside) and store statements per
// op: the same at 10 and 1,000 vTPMs if the work is O(1).
func BenchmarkAgentWatch(b *testing.B) {
	for _, n := range []int{10, 1000} {
		b.Run(fmt.Sprintf("vtpms=%d", n), func(b *testing.B) {
			ctx, cancel := context.WithCancel(context.Background())
			st := storetest.Open(b)
			kr, err := embedded.Open(context.Background(), st, filepath.Join(b.TempDir(), "master.key"))
			if err != nil {
				b.Fatal(err)
			}
			backend := &agenttest.RecordingBackend{}
			records := &countingRecords{Records: agentstore.New(st, kr, nil, nil)}
			a := &agent.Agent{Host: "h1", Capacity: n, Records: records, Backend: backend, Interval: time.Hour}
			if err := a.Register(ctx); err != nil {
				b.Fatal(err)
			}
			ids := make([]string, n)
			for i := range ids {
				ids[i] = fmt.Sprintf("00000000-0000-4000-8000-%012d", i)
				createVTPM(b, st, kr, ids[i])
			}
			if err := a.Reconcile(ctx); err != nil { // all active
				b.Fatal(err)
			}
			var wg sync.WaitGroup
			wg.Go(func() { a.Run(ctx) })
			b.Cleanup(func() { cancel(); wg.Wait() })
			// Run starts with what the pass left queued; the ops start
			// once the agent is idle.
			for last := int64(-1); backend.Calls() != last; time.Sleep(500 * time.Millisecond) {
				last = backend.Calls()
			}

			calls, recs, stmts := backend.Calls(), records.calls.Load(), st.Statements()
			b.ResetTimer()
			for i := range b.N {
				id := ids[i%n]
				want := store.PhaseStopped
				if (i/n)%2 == 1 {
					want = store.PhaseActive
				}
				setDesired(b, st, id, want)
				waitPhase(b, st, id, want)
			}
			b.StopTimer()
			b.ReportMetric(float64(backend.Calls()-calls)/float64(b.N), "backend-calls/op")
			b.ReportMetric(float64(records.calls.Load()-recs)/float64(b.N), "records-calls/op")
			b.ReportMetric(float64(st.Statements()-stmts)/float64(b.N), "statements/op")
		})
	}
}

// createVTPM records a running TPM 2.0 vTPM on h1 as the API does.
func createVTPM(b testing.TB, st *store.Store, kr keyring.Keyring, id string) {
	b.Helper()
	ctx := context.Background()
	payload, err := keyring.NewVTPMSecret()
	if err != nil {
		b.Fatal(err)
	}
	v := &store.VTPM{InstanceID: id, Project: "p1", Spec: spec.Spec{Version: spec.V20, Model: spec.TIS}, Host: "h1",
		Desired: store.DesiredRunning, Phase: store.PhasePending}
	_, err = keyring.CreateRecorded(ctx, kr, "p1", keyring.VTPMSecretName(id), payload, func(sid string) error {
		v.SecretID = sid
		return st.Update(ctx, func(tx *store.Tx) error { return tx.CreateVTPM(v) })
	})
	if err != nil {
		b.Fatal(err)
	}
}

// setDesired asks for id to run (phase active) or stop, as the API does.
func setDesired(b testing.TB, st *store.Store, id string, phase store.Phase) {
	b.Helper()
	err := st.Update(context.Background(), func(tx *store.Tx) error {
		v, err := tx.GetVTPM(id)
		if err != nil {
			return err
		}
		v.Desired = store.DesiredRunning
		if phase == store.PhaseStopped {
			v.Desired = store.DesiredStopped
		}
		return tx.UpdateVTPM(v)
	})
	if err != nil {
		b.Fatal(err)
	}
}

// waitPhase waits until the agent has recorded id in phase.
func waitPhase(b testing.TB, st *store.Store, id string, phase store.Phase) {
	b.Helper()
	timeout := time.After(time.Minute)
	for {
		changed := st.VTPMChanged(id)
		var v *store.VTPM
		if err := st.View(context.Background(), func(tx *store.Tx) (err error) { v, err = tx.GetVTPM(id); return err }); err != nil {
			b.Fatal(err)
		}
		if v.Phase == phase {
			return
		}
		select {
		case <-changed:
		case <-timeout:
			b.Fatalf("%s is %s after a minute, want %s", id, v.Phase, phase)
		}
	}
}

// countingRecords counts the agent's calls to the control plane, its
// heartbeats aside.
type countingRecords struct {
	agent.Records
	calls atomic.Int64
}

func (r *countingRecords) Watch(ctx context.Context, host string, since int64, wait time.Duration) (*agent.Changes, error) {
	r.calls.Add(1)
	return r.Records.Watch(ctx, host, since, wait)
}

func (r *countingRecords) Get(ctx context.Context, id string) (*agent.Record, error) {
	r.calls.Add(1)
	return r.Records.Get(ctx, id)
}

func (r *countingRecords) Update(ctx context.Context, rec *agent.Record, ev agent.Event) error {
	r.calls.Add(1)
	return r.Records.Update(ctx, rec, ev)
}

func (r *countingRecords) Delete(ctx context.Context, rec *agent.Record, ev agent.Event) error {
	r.calls.Add(1)
	return r.Records.Delete(ctx, rec, ev)
}

func (r *countingRecords) Secret(ctx context.Context, rec *agent.Record) ([]byte, error) {
	r.calls.Add(1)
	return r.Records.Secret(ctx, rec)
}

func (r *countingRecords) Rekey(ctx context.Context, rec *agent.Record, secret []byte, ev agent.Event) error {
	r.calls.Add(1)
	return r.Records.Rekey(ctx, rec, secret, ev)
}

// TestRunAfterReconcile: the start-up pass leaves nothing queued, so Run,
// started after it, does not reconcile every vTPM again: a change to one
// vTPM then costs exactly one backend call.
func TestRunAfterReconcile(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	st := storetest.Open(t)
	kr, err := embedded.Open(context.Background(), st, filepath.Join(t.TempDir(), "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	backend := &agenttest.RecordingBackend{}
	a := &agent.Agent{Host: "h1", Capacity: 10, Records: agentstore.New(st, kr, nil, nil), Backend: backend, Interval: time.Hour}
	if err := a.Register(ctx); err != nil {
		t.Fatal(err)
	}
	ids := make([]string, 5)
	for i := range ids {
		ids[i] = fmt.Sprintf("00000000-0000-4000-8000-%012d", i)
		createVTPM(t, st, kr, ids[i])
	}
	if err := a.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	before := backend.Calls()
	var wg sync.WaitGroup
	wg.Go(func() { a.Run(ctx) })
	defer func() { cancel(); wg.Wait() }()
	setDesired(t, st, ids[0], store.PhaseStopped)
	waitPhase(t, st, ids[0], store.PhaseStopped)
	if calls := backend.Calls() - before; calls != 1 {
		t.Fatalf("Run after the start-up pass made %d backend calls for one change, want 1", calls)
	}
}
