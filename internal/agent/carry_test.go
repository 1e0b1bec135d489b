package agent_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
	"github.com/vtpmd/vtpmd/internal/agent/agenttest"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
)

// The agent carries out transfers apart from its watch. A live migration
// needs two libvirt hosts (internal/daemon's TestClusterLiveMigrateConcurrent
// runs real ones); here the source's part is a backend whose sends wait
// until the test lets each go, so that what is seen is the agent's
// scheduling alone.

// gatedSends is a load generator's backend (agenttest.RecordingBackend)
// that also takes live migrations: MigrateLive of an instance waits until
// its gate is opened (or its context ends), and is recorded.
type gatedSends struct {
	agenttest.RecordingBackend
	mu      sync.Mutex
	gates   map[string]chan struct{}
	started map[string]int // MigrateLive calls by instance
	sent    map[string]bool
	inside  int // MigrateLive calls under way
	most    int // the most under way at once
}

var _ agent.LiveMigrator = (*gatedSends)(nil)

func newGatedSends() *gatedSends {
	return &gatedSends{gates: map[string]chan struct{}{}, started: map[string]int{}, sent: map[string]bool{}}
}

// gate is id's gate, made closed.
func (b *gatedSends) gate(id string) chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	g := b.gates[id]
	if g == nil {
		g = make(chan struct{})
		b.gates[id] = g
	}
	return g
}

func (b *gatedSends) PrepareIncoming(context.Context, agent.VTPM, []byte, []agent.EK) (agent.Incoming, error) {
	return agent.Incoming{URI: "qemu+tcp://h2/system"}, nil
}

func (b *gatedSends) MigrateLive(ctx context.Context, v agent.VTPM, to agent.Incoming) error {
	g := b.gate(v.InstanceID)
	b.mu.Lock()
	b.started[v.InstanceID]++
	b.inside++
	b.most = max(b.most, b.inside)
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		b.inside--
		b.mu.Unlock()
	}()
	select {
	case <-g:
	case <-ctx.Done():
		return ctx.Err()
	}
	b.mu.Lock()
	b.sent[v.InstanceID] = true
	b.mu.Unlock()
	return nil
}

func (b *gatedSends) SettleIncoming(context.Context, agent.VTPM) error { return nil }
func (b *gatedSends) AbortIncoming(context.Context, agent.VTPM) error  { return nil }

// calls is how many sends of id began, and whether one finished.
func (b *gatedSends) calls(id string) (started int, sent bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.started[id], b.sent[id]
}

// liveSource is the store and key manager of host h1, whose agent a test
// runs, and h2, a live migration's target.
type liveSource struct {
	st *store.Store
	kr keyring.Keyring
}

func newLiveSource(t *testing.T) *liveSource {
	t.Helper()
	st := storetest.Open(t)
	kr, err := embedded.Open(context.Background(), st, filepath.Join(t.TempDir(), "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	err = st.Update(context.Background(), func(tx *store.Tx) error {
		for _, h := range []string{"h1", "h2"} {
			if err := tx.PutHost(&store.Host{Name: h, Traits: []string{}, Capacity: 10, Backend: "recording"}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return &liveSource{st: st, kr: kr}
}

// run starts an agent of h1 on backend until the returned stop.
func (s *liveSource) run(t *testing.T, backend agent.Backend) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	a := &agent.Agent{Host: "h1", Capacity: 10, Records: agentstore.New(s.st, s.kr, nil, nil), Backend: backend, Interval: time.Hour,
		WatchWait: 5 * time.Second}
	var wg sync.WaitGroup
	wg.Go(func() { a.Run(ctx) })
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); wg.Wait() }) }
	t.Cleanup(stop)
	return stop
}

// send records id's live migration to h2 at step sending and asks h1's
// agent to send it, as the server does.
func (s *liveSource) send(t *testing.T, id string) *store.Transfer {
	t.Helper()
	var x *store.Transfer
	err := s.st.Update(context.Background(), func(tx *store.Tx) error {
		v, err := tx.GetVTPM(id)
		if err != nil {
			return err
		}
		m := &store.Migration{InstanceID: id, Incarnation: v.Incarnation, Source: "h1", Target: "h2", Live: true, Step: store.MigrationSending,
			WasRunning: true, Bundle: []byte(`{"uri":"qemu+tcp://h2/system"}`)}
		if err := tx.StartMigration(m); err != nil {
			return err
		}
		x = &store.Transfer{Host: "h1", InstanceID: id, Incarnation: v.Incarnation, Kind: store.TransferSend, Bundle: m.Bundle}
		return tx.AskTransfer(x)
	})
	if err != nil {
		t.Fatal(err)
	}
	return x
}

// transfer reads x as it is now.
func (s *liveSource) transfer(t *testing.T, x *store.Transfer) *store.Transfer {
	t.Helper()
	var now *store.Transfer
	if err := s.st.View(context.Background(), func(tx *store.Tx) (err error) { now, err = tx.GetTransfer(x.Host, x.ID); return err }); err != nil {
		t.Fatal(err)
	}
	return now
}

// agentRun is the run h1's agent registered last.
func (s *liveSource) agentRun(t *testing.T) string {
	t.Helper()
	var h *store.Host
	if err := s.st.View(context.Background(), func(tx *store.Tx) (err error) { h, err = tx.GetHost("h1"); return err }); err != nil {
		t.Fatal(err)
	}
	return h.AgentRun
}

// eventually waits up to 30 s for cond.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after 30 s: %s", what)
		}
	}
}

// TestSendApartFromTheWatch: while the agent sends one guest (its
// migration stalled), it sends another to the end and answers it, and its
// watch goes on: a third vTPM's stop asked meanwhile is carried out. The
// stalled send is taken by the agent's run, so the watch, woken again and
// again meanwhile, never starts it twice; let go, it is answered.
func TestSendApartFromTheWatch(t *testing.T) {
	s := newLiveSource(t)
	backend := newGatedSends()
	ids := make([]string, 3)
	for i := range ids {
		ids[i] = fmt.Sprintf("00000000-0000-4000-8000-%012d", i+1)
		createVTPM(t, s.st, s.kr, ids[i])
	}
	s.run(t, backend)
	for _, id := range ids {
		waitPhase(t, s.st, id, store.PhaseActive)
	}
	run := s.agentRun(t)
	if run == "" {
		t.Fatal("the agent registered no run")
	}

	slow := s.send(t, ids[0])
	eventually(t, "the first send began", func() bool { n, _ := backend.calls(ids[0]); return n == 1 })
	fast := s.send(t, ids[1])
	close(backend.gate(ids[1]))
	eventually(t, "the second send was answered", func() bool { return s.transfer(t, fast).Answered })
	if got := s.transfer(t, fast); got.Code != "" {
		t.Fatalf("the second send was answered %s: %s", got.Code, got.Message)
	}
	setDesired(t, s.st, ids[2], store.PhaseStopped)
	waitPhase(t, s.st, ids[2], store.PhaseStopped)

	x := s.transfer(t, slow)
	if x.Answered || x.TakenBy != run {
		t.Fatalf("the stalled send: answered %v, taken by %q (the agent's run is %q)", x.Answered, x.TakenBy, run)
	}
	if n, sent := backend.calls(ids[0]); n != 1 || sent {
		t.Fatalf("the stalled send began %d times, finished %v", n, sent)
	}
	backend.mu.Lock()
	most := backend.most
	backend.mu.Unlock()
	if most != 2 {
		t.Fatalf("at most %d sends were under way at once, want both", most)
	}
	close(backend.gate(ids[0]))
	eventually(t, "the stalled send was answered", func() bool { return s.transfer(t, slow).Answered })
	if x := s.transfer(t, slow); x.Code != "" {
		t.Fatalf("the stalled send was answered %s: %s", x.Code, x.Message)
	}
}

// TestRestartCarriesTakenTransfer: a send the agent took and was carrying
// out when it stopped is not answered by it; the agent's next run is
// handed it again and carries it out.
func TestRestartCarriesTakenTransfer(t *testing.T) {
	s := newLiveSource(t)
	const id = "00000000-0000-4000-8000-0000000000a1"
	createVTPM(t, s.st, s.kr, id)
	first := newGatedSends()
	stop := s.run(t, first)
	waitPhase(t, s.st, id, store.PhaseActive)
	firstRun := s.agentRun(t)
	x := s.send(t, id)
	eventually(t, "the first run's send began", func() bool { n, _ := first.calls(id); return n == 1 })
	stop()
	if got := s.transfer(t, x); got.Answered || got.TakenBy != firstRun {
		t.Fatalf("the send the stopped agent was carrying out: answered %v (%s), taken by %q, want %q", got.Answered, got.Code, got.TakenBy, firstRun)
	}

	next := newGatedSends()
	close(next.gate(id))
	s.run(t, next)
	eventually(t, "the next run answered the send", func() bool { return s.transfer(t, x).Answered })
	got := s.transfer(t, x)
	if got.Code != "" || s.agentRun(t) == firstRun || got.TakenBy != s.agentRun(t) {
		t.Fatalf("the send after the restart: %+v; runs %q then %q", got, firstRun, s.agentRun(t))
	}
	if n, sent := next.calls(id); n != 1 || !sent {
		t.Fatalf("the next run's sends of the guest: %d, finished %v", n, sent)
	}
}
