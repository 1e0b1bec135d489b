package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	pgtest.Stop()
	os.Exit(code)
}

// engine opens stores of one database engine: every test runs on both.
type engine struct {
	name string
	// open returns a fresh store with a fixed clock, and how to open the
	// same database again.
	open func(t testing.TB) (*Store, func() (*Store, error))
}

var engines = []engine{
	{"sqlite", func(t testing.TB) (*Store, func() (*Store, error)) {
		path := filepath.Join(t.TempDir(), "vtpmd.db")
		s, err := Open(context.Background(), path, Options{Now: testClock()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			var ok string
			if err := s.db.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil || ok != "ok" {
				t.Errorf("integrity check: %q, %v", ok, err)
			}
			s.Close()
		})
		return s, func() (*Store, error) { return Open(context.Background(), path, Options{}) }
	}},
	{"postgres", func(t testing.TB) (*Store, func() (*Store, error)) {
		dsn := pgtest.DSN(t)
		s, err := OpenPostgres(context.Background(), dsn, Options{Now: testClock()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s, func() (*Store, error) { return OpenPostgres(context.Background(), dsn, Options{}) }
	}},
}

// onEngines runs test once per engine, as a subtest.
func onEngines(t *testing.T, test func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error)))) {
	for _, e := range engines {
		t.Run(e.name, func(t *testing.T) { test(t, e.open) })
	}
}

// testClock ticks a second per read, from a fixed day.
func testClock() func() time.Time {
	clock := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		clock = clock.Add(time.Second)
		return clock
	}
}

func sample(id, project, host string) *VTPM {
	return &VTPM{
		InstanceID: id, Project: project, Host: host,
		Spec:    spec.Spec{Version: spec.V20, Model: spec.CRB, SecretSecurity: spec.User},
		Desired: DesiredRunning, Phase: PhasePending, SecretID: "0f3f5e6a-6d3e-4c43-9a65-1c0b1e0a5b11",
		EKs:     []EK{{Kind: "rsa2048", Handle: 0x81010001, NVIndex: 0x01c00002, PublicDER: []byte{1, 2}, CertDER: []byte{3}}},
		Sockets: Sockets{Data: "/run/vtpmd/" + id + "/tpm.sock", Ctrl: "/run/vtpmd/" + id + "/tpm.sock.ctrl"}, PID: 4242,
	}
}

func putHosts(t testing.TB, s *Store, names ...string) {
	t.Helper()
	err := s.Update(context.Background(), func(tx *Tx) error {
		for _, n := range names {
			if err := tx.PutHost(&Host{Name: n, Traits: []string{spec.TraitTPM20}, Capacity: 10, Backend: "swtpm"}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestVTPMLifecycle(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, reopen := open(t)
		putHosts(t, s, "h1")
		v := sample("i-1", "p1", "h1")
		if err := s.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(v) }); err != nil {
			t.Fatal(err)
		}
		if err := s.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample("i-1", "p2", "h1")) }); !errors.Is(err, ErrExists) {
			t.Fatalf("duplicate create: %v; want ErrExists", err)
		}

		var got *VTPM
		if err := s.View(ctx, func(tx *Tx) (err error) { got, err = tx.GetVTPM("i-1"); return }); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, v) {
			t.Fatalf("read back:\n got %+v\nwant %+v", got, v)
		}

		// An update from a stale read is refused.
		stale := *got
		got.Phase, got.Sockets, got.PID, got.Connected = PhaseActive, Sockets{Data: "/d", Ctrl: "/d.ctrl"}, 4343, true
		if err := s.Update(ctx, func(tx *Tx) error { return tx.UpdateVTPM(got) }); err != nil || got.Generation != 2 {
			t.Fatalf("update: %v, generation %d", err, got.Generation)
		}
		stale.Phase = PhaseError
		if err := s.Update(ctx, func(tx *Tx) error { return tx.UpdateVTPM(&stale) }); !errors.Is(err, ErrConflict) {
			t.Fatalf("stale update: %v; want ErrConflict", err)
		}

		// Reopen: the data survives.
		s.Close()
		s2, err := reopen()
		if err != nil {
			t.Fatal(err)
		}
		s.db = s2.db // the cleanup checks and closes the reopened database
		if err := s2.View(ctx, func(tx *Tx) (err error) { got, err = tx.GetVTPM("i-1"); return }); err != nil || got.Phase != PhaseActive || got.Sockets.Ctrl != "/d.ctrl" || got.PID != 4343 || !got.Connected {
			t.Fatalf("after reopen: %+v, %v", got, err)
		}
		if err := s2.Update(ctx, func(tx *Tx) error { return tx.DeleteVTPM("i-1") }); err != nil {
			t.Fatal(err)
		}
		err = s2.View(ctx, func(tx *Tx) error { _, err := tx.GetVTPM("i-1"); return err })
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("get after delete: %v", err)
		}
		if err := s2.Update(ctx, func(tx *Tx) error { return tx.DeleteVTPM("i-1") }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("second delete: %v", err)
		}
	})
}

func TestUpdateRollsBack(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1")
		boom := errors.New("boom")
		err := s.Update(ctx, func(tx *Tx) error {
			if err := tx.CreateVTPM(sample("i-err", "p", "h1")); err != nil {
				return err
			}
			return boom
		})
		if !errors.Is(err, boom) {
			t.Fatalf("Update = %v", err)
		}
		func() {
			defer func() {
				if recover() == nil {
					t.Fatal("panic was swallowed")
				}
			}()
			s.Update(ctx, func(tx *Tx) error {
				tx.CreateVTPM(sample("i-panic", "p", "h1"))
				panic("midway")
			})
		}()
		var n int
		s.View(ctx, func(tx *Tx) error {
			l, err := tx.ListVTPMs(Filter{})
			n = len(l)
			return err
		})
		if n != 0 {
			t.Fatalf("%d vTPMs survived rolled-back transactions", n)
		}
	})
}

// TestStatements: the count advances by one for each statement a
// transaction runs, committed or not, and by nothing else.
func TestStatements(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1")
		before := s.Statements()
		s.View(ctx, func(tx *Tx) error {
			tx.GetVTPM("i-1")
			tx.GetVTPM("i-2")
			return nil
		})
		s.Update(ctx, func(tx *Tx) error {
			tx.GetVTPM("i-3")
			return errors.New("rolled back")
		})
		if n := s.Statements() - before; n != 3 {
			t.Fatalf("three reads counted as %d statements", n)
		}
	})
}

// TestRetries: on PostgreSQL a transaction that loses a serialization
// conflict runs again, and the store counts it.
func TestRetries(t *testing.T) {
	ctx := context.Background()
	s, _ := engines[1].open(t)
	putHosts(t, s, "h1")
	before := s.Retries()
	read, written := make(chan struct{}), make(chan struct{})
	tries := 0
	done := make(chan error)
	go func() {
		done <- s.Update(ctx, func(tx *Tx) error {
			tries++
			h, err := tx.GetHost("h1")
			if err != nil {
				return err
			}
			if tries == 1 {
				close(read) // the other writes h1 now, and commits first
				<-written
			}
			h.Capacity++
			return tx.PutHost(h)
		})
	}()
	<-read
	err := s.Update(ctx, func(tx *Tx) error {
		h, err := tx.GetHost("h1")
		if err != nil {
			return err
		}
		h.Capacity++
		return tx.PutHost(h)
	})
	close(written)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := s.Retries() - before; tries != 2 || n != 1 {
		t.Fatalf("the loser ran %d times, %d retries counted; want 2 and 1", tries, n)
	}
	var h *Host
	s.View(ctx, func(tx *Tx) (err error) { h, err = tx.GetHost("h1"); return err })
	if h.Capacity != 12 {
		t.Fatalf("capacity %d after two increments of 10", h.Capacity)
	}
}

func TestListFiltersAndPages(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1", "h2")
		err := s.Update(ctx, func(tx *Tx) error {
			for i := range 10 {
				v := sample(fmt.Sprintf("i-%02d", i), []string{"pa", "pb"}[i%2], []string{"h1", "h2"}[i/5])
				if i == 3 {
					v.Phase = PhaseError
				}
				if err := tx.CreateVTPM(v); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		ids := func(f Filter) []string {
			var out []string
			s.View(ctx, func(tx *Tx) error {
				l, err := tx.ListVTPMs(f)
				for _, v := range l {
					out = append(out, v.InstanceID)
				}
				return err
			})
			return out
		}
		cases := []struct {
			f    Filter
			want []string
		}{
			{Filter{Project: "pa", Host: "h1"}, []string{"i-00", "i-02", "i-04"}},
			{Filter{Phase: PhaseError}, []string{"i-03"}},
			{Filter{Limit: 3}, []string{"i-00", "i-01", "i-02"}},
			{Filter{Limit: 3, After: "i-02"}, []string{"i-03", "i-04", "i-05"}},
			{Filter{Host: "h2", After: "i-08"}, []string{"i-09"}},
			{Filter{Project: "nobody"}, nil},
		}
		for _, c := range cases {
			if got := ids(c.f); !reflect.DeepEqual(got, c.want) {
				t.Errorf("ListVTPMs(%+v) = %v; want %v", c.f, got, c.want)
			}
		}
		var loads []*HostLoad
		s.View(ctx, func(tx *Tx) (err error) { loads, err = tx.ListHostLoads(tx.now); return })
		counts := map[string]int{}
		for _, h := range loads {
			counts[h.Name] = h.VTPMs
		}
		if !reflect.DeepEqual(counts, map[string]int{"h1": 5, "h2": 5}) {
			t.Fatalf("counts = %v", counts)
		}
	})
}

func TestEventsAreAppendOnly(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		err := s.Update(ctx, func(tx *Tx) error {
			for _, a := range []string{"created", "started"} {
				if err := tx.AppendEvent(Event{Actor: "api:p", InstanceID: "i-1", Action: a}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		var evs []Event
		s.View(ctx, func(tx *Tx) (err error) { evs, err = tx.ListEvents("i-1", ""); return })
		if len(evs) != 2 || evs[0].Action != "created" || evs[1].Action != "started" || evs[0].ID >= evs[1].ID || evs[0].At.IsZero() {
			t.Fatalf("events = %+v", evs)
		}
		for _, q := range []string{`UPDATE events SET action='x'`, `DELETE FROM events`} {
			err := s.Update(ctx, func(tx *Tx) error { _, err := tx.exec(q); return err })
			if err == nil {
				t.Fatalf("%s succeeded on the append-only log", q)
			}
		}
	})
}

func TestHosts(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "b", "a")
		if err := s.Update(ctx, func(tx *Tx) error {
			return tx.PutHost(&Host{Name: "a", Traits: []string{"X", "Y"}, Capacity: 3, Backend: "libvirt"})
		}); err != nil {
			t.Fatal(err)
		}
		var hs []*Host
		s.View(ctx, func(tx *Tx) (err error) { hs, err = tx.ListHosts(); return })
		if len(hs) != 2 || hs[0].Name != "a" || hs[0].Capacity != 3 || !reflect.DeepEqual(hs[0].Traits, []string{"X", "Y"}) || hs[1].Name != "b" {
			t.Fatalf("hosts = %+v", hs)
		}
		err := s.View(ctx, func(tx *Tx) error { _, err := tx.GetHost("zz"); return err })
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetHost unknown: %v", err)
		}
		// A vTPM must name a known host.
		err = s.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample("i-x", "p", "nohost")) })
		if err == nil {
			t.Fatal("vTPM on an unknown host was accepted")
		}
	})
}

// TestHostHeartbeatsAndDrain: registering is a heartbeat; a heartbeat
// moves the host's time and version and nothing else; a drain is the
// operator's and outlives the agent registering again; a host never
// registered has no heartbeat or drain.
func TestHostHeartbeatsAndDrain(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		get := func() *Host {
			t.Helper()
			var h *Host
			if err := s.View(ctx, func(tx *Tx) (err error) { h, err = tx.GetHost("h1"); return err }); err != nil {
				t.Fatal(err)
			}
			return h
		}
		reg := &Host{Name: "h1", Traits: []string{spec.TraitTPM20}, Capacity: 4, Backend: "swtpm", Version: "v1.0.0"}
		if err := s.Update(ctx, func(tx *Tx) error { return tx.PutHost(reg) }); err != nil {
			t.Fatal(err)
		}
		registered := get()
		if registered.HeartbeatAt.IsZero() || !registered.HeartbeatAt.Equal(reg.HeartbeatAt) || registered.Version != "v1.0.0" || registered.Draining {
			t.Fatalf("registered: %+v", registered)
		}

		if err := s.Update(ctx, func(tx *Tx) error { return tx.Heartbeat("h1", "v1.1.0") }); err != nil {
			t.Fatal(err)
		}
		beat := get()
		if !beat.HeartbeatAt.After(registered.HeartbeatAt) || beat.Version != "v1.1.0" || beat.Capacity != 4 || !reflect.DeepEqual(beat.Traits, reg.Traits) {
			t.Fatalf("after a heartbeat: %+v (registered %+v)", beat, registered)
		}

		for i, want := range []bool{true, false} { // drained, then again: no change
			var changed bool
			if err := s.Update(ctx, func(tx *Tx) (err error) { changed, err = tx.SetDraining("h1", true); return err }); err != nil || changed != want {
				t.Fatalf("drain %d: changed %v, %v; want %v", i+1, changed, err, want)
			}
		}
		if err := s.Update(ctx, func(tx *Tx) error { return tx.PutHost(&Host{Name: "h1", Capacity: 5, Backend: "swtpm"}) }); err != nil {
			t.Fatal(err)
		}
		if h := get(); !h.Draining || h.Capacity != 5 || !h.HeartbeatAt.After(beat.HeartbeatAt) {
			t.Fatalf("registered again while draining: %+v", h)
		}
		var changed bool
		if err := s.Update(ctx, func(tx *Tx) (err error) { changed, err = tx.SetDraining("h1", false); return err }); err != nil || !changed || get().Draining {
			t.Fatalf("undrain: changed %v, %v, %+v", changed, err, get())
		}

		if err := s.Update(ctx, func(tx *Tx) error { return tx.Heartbeat("h2", "v1") }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("heartbeat of an unknown host: %v, want ErrNotFound", err)
		}
		if err := s.Update(ctx, func(tx *Tx) error { _, err := tx.SetDraining("h2", true); return err }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("draining an unknown host: %v, want ErrNotFound", err)
		}
	})
}

func TestVTPMChanged(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1")
		closed := func(ch <-chan struct{}) bool {
			select {
			case <-ch:
				return true
			default:
				return false
			}
		}
		write := func(fn func(tx *Tx) error) {
			t.Helper()
			if err := s.Update(ctx, fn); err != nil {
				t.Fatal(err)
			}
		}
		ch := s.VTPMChanged("i-1")
		if s.VTPMChanged("i-1") != ch {
			t.Fatal("two readers waiting for the same vTPM got different channels")
		}
		write(func(tx *Tx) error { return tx.CreateVTPM(sample("i-1", "p", "h1")) })
		if !closed(ch) {
			t.Fatal("creating the vTPM did not signal")
		}
		ch, other := s.VTPMChanged("i-1"), s.VTPMChanged("i-2")
		s.View(ctx, func(tx *Tx) error { _, err := tx.GetVTPM("i-1"); return err })
		s.Update(ctx, func(tx *Tx) error {
			v, _ := tx.GetVTPM("i-1")
			v.Phase = PhaseActive
			tx.UpdateVTPM(v)
			return errors.New("rolled back")
		})
		write(func(tx *Tx) error { return tx.CreateVTPM(sample("i-2", "p", "h1")) })
		if closed(ch) {
			t.Fatal("a read, a rolled-back update or another vTPM's commit signalled a change")
		}
		if !closed(other) {
			t.Fatal("the other vTPM's creation did not signal its own waiters")
		}
		write(func(tx *Tx) error {
			v, err := tx.GetVTPM("i-1")
			if err != nil {
				return err
			}
			v.Phase = PhaseActive
			return tx.UpdateVTPM(v)
		})
		if !closed(ch) {
			t.Fatal("an update did not signal")
		}
		ch = s.VTPMChanged("i-1")
		write(func(tx *Tx) error { return tx.DeleteVTPM("i-1") })
		if !closed(ch) {
			t.Fatal("a delete did not signal")
		}
		if closed(s.VTPMChanged("i-1")) {
			t.Fatal("the channel after a commit is already closed")
		}
	})
}

// TestDrift: a drift request wakes the host's watchers and shows in its
// watch until answered; a repair asked stays asked through a later plain
// request until an answer covers it; answers wake waiters too.
func TestDrift(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1")
		watch := func() *Changes {
			t.Helper()
			var c *Changes
			if err := s.View(ctx, func(tx *Tx) (err error) { c, err = tx.WatchVTPMs("h1", 0); return err }); err != nil {
				t.Fatal(err)
			}
			return c
		}
		if c := watch(); c.DriftAsked != 0 {
			t.Fatalf("a drift request before any: %+v", c)
		}
		woken := s.HostChanged("h1")
		var asked int64
		if err := s.Update(ctx, func(tx *Tx) (err error) { asked, err = tx.AskDrift("h1", true); return err }); err != nil || asked != 1 {
			t.Fatalf("ask: %d %v", asked, err)
		}
		if err := s.Update(ctx, func(tx *Tx) (err error) { asked, err = tx.AskDrift("h1", false); return err }); err != nil || asked != 2 {
			t.Fatalf("ask again: %d %v", asked, err)
		}
		select {
		case <-woken:
		default:
			t.Fatal("a drift request did not wake the host's watchers")
		}
		if c := watch(); c.DriftAsked != 2 || !c.DriftRepair {
			t.Fatalf("the watch after a repair then a check: %+v", c)
		}
		woken = s.HostChanged("h1")
		if err := s.Update(ctx, func(tx *Tx) error { return tx.AnswerDrift("h1", 2, []byte(`[{"kind":"orphan"}]`)) }); err != nil {
			t.Fatal(err)
		}
		<-woken
		if c := watch(); c.DriftAsked != 0 || c.DriftRepair {
			t.Fatalf("the watch after the answer: %+v", c)
		}
		var d *Drift
		if err := s.View(ctx, func(tx *Tx) (err error) { d, err = tx.GetDrift("h1"); return err }); err != nil {
			t.Fatal(err)
		}
		if d.Asked != 2 || d.Answered != 2 || d.Repair || string(d.Findings) != `[{"kind":"orphan"}]` || d.At.IsZero() {
			t.Fatalf("drift: %+v", d)
		}
		if err := s.Update(ctx, func(tx *Tx) error { _, err := tx.AskDrift("h9", false); return err }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("asking an unknown host: %v", err)
		}
	})
}

// TestRoom: a host's room is its capacity less the vTPMs placed on it,
// whichever way they came or left; an unknown host is not found.
func TestRoom(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1", "h2") // capacity 10 each
		room := func(host string) int {
			t.Helper()
			var n int
			if err := s.View(ctx, func(tx *Tx) (err error) { n, err = tx.Room(host); return err }); err != nil {
				t.Fatal(err)
			}
			return n
		}
		err := s.Update(ctx, func(tx *Tx) error {
			for _, id := range []string{"i-1", "i-2", "i-3"} {
				if err := tx.CreateVTPM(sample(id, "p1", "h1")); err != nil {
					return err
				}
			}
			v, err := tx.GetVTPM("i-3")
			if err != nil {
				return err
			}
			v.Host = "h2"
			if err := tx.UpdateVTPM(v); err != nil {
				return err
			}
			return tx.DeleteVTPM("i-2")
		})
		if err != nil {
			t.Fatal(err)
		}
		if r1, r2 := room("h1"), room("h2"); r1 != 9 || r2 != 9 {
			t.Fatalf("room: h1 %d, h2 %d; want 9 and 9", r1, r2)
		}
		err = s.View(ctx, func(tx *Tx) error { _, err := tx.Room("h9"); return err })
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("room of an unknown host: %v", err)
		}
	})
}
