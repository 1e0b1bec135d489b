package store

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"
)

// watcher reads what changed on hosts of one store, failing the test on an
// error.
type watcher struct {
	t testing.TB
	s *Store
}

// watch reads host's changes after revision since (of the database's
// current timeline: these tests are about revisions, not failovers).
func (w watcher) watch(host string, since int64) *Changes {
	w.t.Helper()
	var c *Changes
	err := w.s.View(context.Background(), func(tx *Tx) (err error) {
		var tl int64
		if tx.pg {
			var wal string
			if err := tx.queryRow(`SELECT pg_walfile_name(pg_current_wal_lsn())`).Scan(&wal); err != nil {
				return err
			}
			if tl, err = strconv.ParseInt(wal[:8], 16, 64); err != nil {
				return err
			}
		}
		c, err = tx.WatchVTPMs(host, watchToken(tl, since))
		return err
	})
	if err != nil {
		w.t.Fatal(err)
	}
	return c
}

func (w watcher) write(fn func(tx *Tx) error) {
	w.t.Helper()
	if err := w.s.Update(context.Background(), fn); err != nil {
		w.t.Fatal(err)
	}
}

// update changes id's phase in a transaction of its own.
func (w watcher) update(id string, phase Phase) {
	w.t.Helper()
	w.write(func(tx *Tx) error {
		v, err := tx.GetVTPM(id)
		if err != nil {
			return err
		}
		v.Phase = phase
		return tx.UpdateVTPM(v)
	})
}

func ids(vs []*VTPM) []string {
	var out []string
	for _, v := range vs {
		out = append(out, v.InstanceID)
	}
	return out
}

func goneIDs(gs []Tombstone) []string {
	var out []string
	for _, g := range gs {
		out = append(out, g.InstanceID)
	}
	return out
}

// Each transaction that writes a host's vTPMs takes that host's next
// revision, once however many it writes; hosts count apart, and writes of
// anything but vTPM records count for nothing.
func TestWatchRevisions(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		s, _ := open(t)
		w := watcher{t, s}
		putHosts(t, s, "h1", "h2")
		if c := w.watch("h1", 0); c.Revision != 0 || !c.Reset || len(c.VTPMs) != 0 {
			t.Fatalf("a host never written: %+v", c)
		}
		w.write(func(tx *Tx) error { return tx.CreateVTPM(sample("i-1", "p", "h1")) })
		w.write(func(tx *Tx) error {
			for _, id := range []string{"i-2", "i-3"} {
				if err := tx.CreateVTPM(sample(id, "p", "h1")); err != nil {
					return err
				}
			}
			return tx.CreateVTPM(sample("i-4", "p", "h2"))
		})
		w.update("i-1", PhaseActive)
		w.write(func(tx *Tx) error {
			if err := tx.Heartbeat("h1", "v1"); err != nil {
				return err
			}
			if err := tx.AppendEvent(Event{Actor: "agent:h1", InstanceID: "i-1", Action: "started"}); err != nil {
				return err
			}
			return tx.PutAttestation(&Attestation{InstanceID: "i-1"})
		})
		c := w.watch("h1", 0)
		got := map[string]int64{}
		for _, v := range c.VTPMs {
			got[v.InstanceID] = v.Revision
		}
		if want := map[string]int64{"i-2": 2, "i-3": 2, "i-1": 3}; c.Revision != 3 || !maps.Equal(got, want) {
			t.Fatalf("h1: revision %d, records at %v; want 3, %v", c.Revision, got, want)
		}
		if !slices.Equal(ids(c.VTPMs), []string{"i-2", "i-3", "i-1"}) {
			t.Errorf("records not by revision: %q", ids(c.VTPMs))
		}
		if c := w.watch("h2", 0); c.Revision != 1 || len(c.VTPMs) != 1 || c.VTPMs[0].Revision != 1 {
			t.Fatalf("h2: %+v", c)
		}
		// The record a write returns carries its revision.
		var v *VTPM
		w.write(func(tx *Tx) (err error) {
			if v, err = tx.GetVTPM("i-4"); err != nil {
				return err
			}
			return tx.UpdateVTPM(v)
		})
		if v.Revision != 2 {
			t.Errorf("updated record's revision %d, want 2", v.Revision)
		}
	})
}

// A watcher is told what changed since it last looked, and only that.
func TestWatchChanges(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		s, _ := open(t)
		w := watcher{t, s}
		putHosts(t, s, "h1", "h2")
		w.write(func(tx *Tx) error { return tx.CreateVTPM(sample("i-h2", "p", "h2")) })
		w.write(func(tx *Tx) error {
			for i := range 1000 {
				if err := tx.CreateVTPM(sample(fmt.Sprintf("i-%04d", i), "p", "h1")); err != nil {
					return err
				}
			}
			return nil
		})
		c := w.watch("h1", 0)
		if !c.Reset || len(c.VTPMs) != 1000 || len(c.Gone) != 0 {
			t.Fatalf("from 0: reset %v, %d records, %d gone; want everything", c.Reset, len(c.VTPMs), len(c.Gone))
		}
		since := c.Revision
		if c := w.watch("h1", since); c.Reset || len(c.VTPMs) != 0 || len(c.Gone) != 0 || c.Revision != since {
			t.Fatalf("nothing changed: %+v", c)
		}

		w.update("i-0500", PhaseActive)
		c = w.watch("h1", since)
		if c.Reset || !slices.Equal(ids(c.VTPMs), []string{"i-0500"}) || c.VTPMs[0].Phase != PhaseActive || len(c.Gone) != 0 || c.Revision != since+1 {
			t.Fatalf("one of 1000 updated: reset %v, records %q, gone %v, revision %d", c.Reset, ids(c.VTPMs), c.Gone, c.Revision)
		}
		since = c.Revision

		var deleted string
		w.write(func(tx *Tx) error {
			v, err := tx.GetVTPM("i-0001")
			if err != nil {
				return err
			}
			deleted = v.Incarnation
			return tx.DeleteVTPM("i-0001")
		})
		c = w.watch("h1", since)
		if c.Reset || len(c.VTPMs) != 0 || len(c.Gone) != 1 || c.Gone[0] != (Tombstone{"i-0001", deleted, since + 1}) {
			t.Fatalf("a delete: %+v", c)
		}
		if c := w.watch("h2", 1); len(c.VTPMs) != 0 || c.Revision != 1 {
			t.Fatalf("another host's write seen on h2: %+v", c)
		}

		// Deleted and made again: the new record, and no tombstone.
		w.write(func(tx *Tx) error { return tx.DeleteVTPM("i-0002") })
		w.write(func(tx *Tx) error { return tx.CreateVTPM(sample("i-0002", "p", "h1")) })
		c2 := w.watch("h1", since)
		if !slices.Equal(ids(c2.VTPMs), []string{"i-0002"}) || !slices.Equal(goneIDs(c2.Gone), []string{"i-0001"}) {
			t.Fatalf("deleted and made again: records %q, gone %q", ids(c2.VTPMs), goneIDs(c2.Gone))
		}
		since = c2.Revision

		// Moved: gone from the old host, a record on the new one.
		h2 := w.watch("h2", 0).Revision
		w.write(func(tx *Tx) error {
			v, err := tx.GetVTPM("i-0003")
			if err != nil {
				return err
			}
			v.Host = "h2"
			return tx.UpdateVTPM(v)
		})
		c = w.watch("h1", since)
		if len(c.VTPMs) != 0 || !slices.Equal(goneIDs(c.Gone), []string{"i-0003"}) {
			t.Fatalf("moved away: records %q, gone %q", ids(c.VTPMs), goneIDs(c.Gone))
		}
		c = w.watch("h2", h2)
		if c.Reset || !slices.Equal(ids(c.VTPMs), []string{"i-0003"}) || c.VTPMs[0].Host != "h2" || len(c.Gone) != 0 {
			t.Fatalf("moved here: %+v", c)
		}
		// And back: a record again, not gone.
		w.write(func(tx *Tx) error {
			v, err := tx.GetVTPM("i-0003")
			if err != nil {
				return err
			}
			v.Host = "h1"
			return tx.UpdateVTPM(v)
		})
		c = w.watch("h1", since)
		if !slices.Equal(ids(c.VTPMs), []string{"i-0003"}) || len(c.Gone) != 0 {
			t.Fatalf("moved away and back: records %q, gone %q", ids(c.VTPMs), goneIDs(c.Gone))
		}
		if c := w.watch("h2", h2+1); !slices.Equal(goneIDs(c.Gone), []string{"i-0003"}) {
			t.Fatalf("moved back from h2: gone %q", goneIDs(c.Gone))
		}

		// A revision the host never reached (a restored database): start over.
		c = w.watch("h1", c.Revision+1000)
		if !c.Reset || len(c.VTPMs) != 999 || len(c.Gone) != 0 {
			t.Fatalf("since beyond the revision: reset %v, %d records, %d gone", c.Reset, len(c.VTPMs), len(c.Gone))
		}
	})
}

// Tombstones older than TombstoneWindow go when the host gets a new one; a
// watcher that looked before the last of them starts over, a later one
// does not.
func TestWatchPrunesTombstones(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		s, _ := open(t)
		w := watcher{t, s}
		putHosts(t, s, "h1", "h2")
		for _, id := range []string{"i-1", "i-2", "i-3", "i-4"} {
			w.write(func(tx *Tx) error { return tx.CreateVTPM(sample(id, "p", "h1")) })
		}
		w.write(func(tx *Tx) error { return tx.CreateVTPM(sample("i-9", "p", "h2")) })
		before := w.watch("h1", 0).Revision
		w.write(func(tx *Tx) error { return tx.DeleteVTPM("i-1") })
		after := w.watch("h1", 0).Revision
		w.write(func(tx *Tx) error { return tx.DeleteVTPM("i-9") })

		clock := s.now
		s.now = func() time.Time { return clock().Add(TombstoneWindow - time.Minute) }
		w.write(func(tx *Tx) error { return tx.DeleteVTPM("i-2") })
		if c := w.watch("h1", before); c.Reset || !slices.Equal(goneIDs(c.Gone), []string{"i-1", "i-2"}) {
			t.Fatalf("within the window: reset %v, gone %q", c.Reset, goneIDs(c.Gone))
		}
		s.now = func() time.Time { return clock().Add(TombstoneWindow + time.Minute) }
		w.write(func(tx *Tx) error { return tx.DeleteVTPM("i-3") })
		c := w.watch("h1", before)
		if !c.Reset || !slices.Equal(ids(c.VTPMs), []string{"i-4"}) || len(c.Gone) != 0 {
			t.Fatalf("since before a pruned tombstone: reset %v, records %q, gone %q", c.Reset, ids(c.VTPMs), goneIDs(c.Gone))
		}
		if c := w.watch("h1", after); c.Reset || !slices.Equal(goneIDs(c.Gone), []string{"i-2", "i-3"}) {
			t.Fatalf("since the pruned tombstone: reset %v, gone %q", c.Reset, goneIDs(c.Gone))
		}
		// h2's tombstone, as old, stays until h2 gets a new one.
		if c := w.watch("h2", 1); c.Reset || !slices.Equal(goneIDs(c.Gone), []string{"i-9"}) {
			t.Fatalf("another host's tombstone: reset %v, gone %q", c.Reset, goneIDs(c.Gone))
		}
	})
}

// HostChanged is closed by the commits that write a vTPM placed on the
// host, or moved to or from it, and by no other.
func TestHostChanged(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		w := watcher{t, s}
		putHosts(t, s, "h1", "h2")
		closed := func(ch <-chan struct{}) bool {
			select {
			case <-ch:
				return true
			default:
				return false
			}
		}
		h1, h2 := s.HostChanged("h1"), s.HostChanged("h2")
		if s.HostChanged("h1") != h1 {
			t.Fatal("two watchers of one host got different channels")
		}
		w.write(func(tx *Tx) error { return tx.CreateVTPM(sample("i-1", "p", "h1")) })
		if !closed(h1) || closed(h2) {
			t.Fatalf("a vTPM made on h1: h1 closed %v, h2 closed %v", closed(h1), closed(h2))
		}
		h1 = s.HostChanged("h1")
		vtpm := s.VTPMChanged("i-1")
		s.Update(ctx, func(tx *Tx) error {
			tx.CreateVTPM(sample("i-2", "p", "h1"))
			return errors.New("rolled back")
		})
		w.write(func(tx *Tx) error {
			if err := tx.Heartbeat("h1", "v1"); err != nil {
				return err
			}
			return tx.AppendEvent(Event{Actor: "agent:h1", InstanceID: "i-1", Action: "started"})
		})
		w.watch("h1", 0)
		w.write(func(tx *Tx) error { return tx.CreateVTPM(sample("i-3", "p", "h2")) })
		if closed(h1) || closed(vtpm) {
			t.Fatal("a rollback, a heartbeat, an event, a read or another host's write signalled h1")
		}
		if !closed(h2) {
			t.Fatal("a vTPM made on h2 did not signal h2")
		}
		w.write(func(tx *Tx) error {
			v, err := tx.GetVTPM("i-1")
			if err != nil {
				return err
			}
			v.Host = "h2"
			return tx.UpdateVTPM(v)
		})
		h2 = s.HostChanged("h2")
		if !closed(h1) || !closed(vtpm) {
			t.Fatal("a move did not signal the old host, or the vTPM")
		}
		h1 = s.HostChanged("h1")
		w.write(func(tx *Tx) error { return tx.DeleteVTPM("i-1") })
		if closed(h1) || !closed(h2) {
			t.Fatalf("a delete on h2: h1 closed %v, h2 closed %v", closed(h1), closed(h2))
		}
		if closed(s.HostChanged("h2")) {
			t.Fatal("the channel after a commit is already closed")
		}
	})
}

// Writers of one host's vTPMs at once all commit (PostgreSQL retries the
// ones that lose the host's counter row), each with a revision of its own,
// none skipped.
func TestWatchConcurrentWriters(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		w := watcher{t, s}
		putHosts(t, s, "h1")
		const writers, writes = 8, 10
		for i := range writers {
			w.write(func(tx *Tx) error { return tx.CreateVTPM(sample(fmt.Sprintf("i-%d", i), "p", "h1")) })
		}
		start := w.watch("h1", 0).Revision
		var mu sync.Mutex
		var revisions []int64
		var wg sync.WaitGroup
		errs := make(chan error, writers*writes)
		for i := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range writes {
					var v *VTPM
					err := s.Update(ctx, func(tx *Tx) (err error) {
						if v, err = tx.GetVTPM(fmt.Sprintf("i-%d", i)); err != nil {
							return err
						}
						v.Phase = PhaseActive
						return tx.UpdateVTPM(v)
					})
					if err != nil {
						errs <- err
						continue
					}
					mu.Lock()
					revisions = append(revisions, v.Revision)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Errorf("a write failed: %v", err)
		}
		slices.Sort(revisions)
		for n, r := range revisions {
			if r != start+int64(n)+1 {
				t.Fatalf("revisions of %d writes from %d: %v; want each of %d…%d once", len(revisions), start, revisions, start+1, start+writers*writes)
			}
		}
		c := w.watch("h1", start)
		if c.Revision != start+writers*writes || len(c.VTPMs) != writers {
			t.Fatalf("after the writes: revision %d, %d records", c.Revision, len(c.VTPMs))
		}
	})
}

// TestCommitsWakeOtherStores: on PostgreSQL a commit by one Store (one
// server process) wakes the waiters of another on the same database at
// once, through LISTEN/NOTIFY, for what it changed only; a transaction
// that rolls back wakes no one.
func TestCommitsWakeOtherStores(t *testing.T) {
	a, reopen := engines[1].open(t) // PostgreSQL
	b, err := reopen()
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	<-b.listened
	ctx := context.Background()
	putHosts(t, a, "h1", "h2")
	host, other, vtpm := b.HostChanged("h1"), b.HostChanged("h2"), b.VTPMChanged("i-1")
	boom := errors.New("boom")
	if err := a.Update(ctx, func(tx *Tx) error {
		if err := tx.CreateVTPM(sample("i-9", "p1", "h2")); err != nil {
			return err
		}
		return boom
	}); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if err := a.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample("i-1", "p1", "h1")) }); err != nil {
		t.Fatal(err)
	}
	for name, ch := range map[string]<-chan struct{}{"h1's watchers": host, "i-1's": vtpm} {
		select {
		case <-ch:
		case <-time.After(30 * time.Second):
			t.Fatalf("another store's commit did not wake %s", name)
		}
	}
	select {
	case <-other:
		t.Fatal("h2's watchers woke for a rolled-back create and another host's")
	default:
	}
}
