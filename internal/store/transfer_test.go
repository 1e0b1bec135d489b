package store

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

// TestSweepTransfers: the requests asked before the cutoff go, answered or
// not, each reported once by the sweep that removed it (two at once report
// none twice); younger ones stay.
func TestSweepTransfers(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1", "h2")
		var asked []*Transfer
		err := s.Update(ctx, func(tx *Tx) error {
			for _, x := range []*Transfer{
				{Host: "h1", InstanceID: "i-1", Incarnation: "a", Kind: TransferExport, Generation: 3},
				{Host: "h2", InstanceID: "i-1", Incarnation: "a", Kind: TransferReceive, Generation: 3, Bundle: []byte("bundle")},
				{Host: "h1", InstanceID: "i-2", Incarnation: "b", Kind: TransferDiscard},
			} {
				if err := tx.AskTransfer(x); err != nil {
					return err
				}
				asked = append(asked, x)
			}
			return tx.AnswerTransfer("h1", asked[0].ID, []byte("exported"), "", "")
		})
		if err != nil {
			t.Fatal(err)
		}
		sweep := func(cutoff time.Time) (out []Transfer) {
			t.Helper()
			if err := s.Update(ctx, func(tx *Tx) (err error) { out, err = tx.SweepTransfers(cutoff); return err }); err != nil {
				t.Fatal(err)
			}
			return out
		}
		if got := sweep(asked[0].AskedAt); len(got) != 0 {
			t.Fatalf("swept requests younger than the cutoff: %+v", got)
		}

		var mu sync.Mutex
		var swept []Transfer
		var wg sync.WaitGroup
		for range 2 {
			wg.Go(func() {
				got := sweep(asked[2].AskedAt.Add(time.Second))
				mu.Lock()
				swept = append(swept, got...)
				mu.Unlock()
			})
		}
		wg.Wait()
		ids := func(xs []Transfer) (out []string) {
			for _, x := range xs {
				out = append(out, x.ID)
			}
			slices.Sort(out)
			return out
		}
		want := ids([]Transfer{*asked[0], *asked[1], *asked[2]})
		if got := ids(swept); !slices.Equal(got, want) {
			t.Fatalf("swept %v, want each of %v once", got, want)
		}
		for _, x := range swept {
			a := asked[slices.IndexFunc(asked, func(a *Transfer) bool { return a.ID == x.ID })]
			if x.Host != a.Host || x.InstanceID != a.InstanceID || x.Incarnation != a.Incarnation || x.Kind != a.Kind ||
				x.Generation != a.Generation || x.Answered != (a == asked[0]) || x.Bundle != nil || x.AskedAt.IsZero() {
				t.Fatalf("swept %+v, asked %+v", x, a)
			}
		}
		err = s.View(ctx, func(tx *Tx) error { _, err := tx.GetTransfer("h2", asked[1].ID); return err })
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("a swept request read back: %v", err)
		}
	})
}

// TestTakeTransfer: a request the host's agent took is no longer handed to
// that run by the watch, but is to the next run (the agent restarted) and
// to an agent that names no run; only the host's own request waiting for
// an answer can be taken, and taking it twice changes nothing.
func TestTakeTransfer(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		register := func(host, run string) {
			t.Helper()
			err := s.Update(ctx, func(tx *Tx) error {
				return tx.PutHost(&Host{Name: host, Traits: []string{}, Capacity: 10, Backend: "libvirt", AgentRun: run})
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		register("h1", "run-1")
		register("h2", "run-x")
		var asked []*Transfer
		err := s.Update(ctx, func(tx *Tx) error {
			for _, x := range []*Transfer{
				{Host: "h1", InstanceID: "i-1", Incarnation: "a", Kind: TransferSend},
				{Host: "h1", InstanceID: "i-2", Incarnation: "b", Kind: TransferExport, Generation: 2},
				{Host: "h2", InstanceID: "i-3", Incarnation: "c", Kind: TransferPrepare},
			} {
				if err := tx.AskTransfer(x); err != nil {
					return err
				}
				asked = append(asked, x)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		handed := func(host string) (ids []string) {
			t.Helper()
			err := s.View(ctx, func(tx *Tx) error {
				ch, err := tx.WatchVTPMs(host, 0)
				for _, x := range ch.Transfers {
					ids = append(ids, x.ID)
				}
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			slices.Sort(ids)
			return ids
		}
		take := func(host, id string) error {
			return s.Update(ctx, func(tx *Tx) error { return tx.TakeTransfer(host, id) })
		}
		sorted := func(ids ...string) []string { slices.Sort(ids); return ids }
		if got, want := handed("h1"), sorted(asked[0].ID, asked[1].ID); !slices.Equal(got, want) {
			t.Fatalf("h1 is handed %v, want %v", got, want)
		}

		for range 2 {
			if err := take("h1", asked[0].ID); err != nil {
				t.Fatalf("taking h1's request: %v", err)
			}
		}
		for _, id := range []string{asked[2].ID, "0123456789abcdef0123456789abcdef"} {
			if err := take("h1", id); !errors.Is(err, ErrNotFound) {
				t.Fatalf("h1 took request %s (another host's, or none): %v", id, err)
			}
		}
		var x *Transfer
		if err := s.View(ctx, func(tx *Tx) (err error) { x, err = tx.GetTransfer("h1", asked[0].ID); return err }); err != nil {
			t.Fatal(err)
		}
		if x.TakenBy != "run-1" || x.Answered {
			t.Fatalf("the request taken reads taken by %q, answered %v", x.TakenBy, x.Answered)
		}
		if got, want := handed("h1"), []string{asked[1].ID}; !slices.Equal(got, want) {
			t.Fatalf("after the take h1 is handed %v, want %v", got, want)
		}
		if got, want := handed("h2"), []string{asked[2].ID}; !slices.Equal(got, want) {
			t.Fatalf("h2 is handed %v, want %v", got, want)
		}

		// The agent restarts: its new run is handed what the old one took.
		register("h1", "run-2")
		if got, want := handed("h1"), sorted(asked[0].ID, asked[1].ID); !slices.Equal(got, want) {
			t.Fatalf("the agent's next run is handed %v, want %v", got, want)
		}
		var h *Host
		if err := s.View(ctx, func(tx *Tx) (err error) { h, err = tx.GetHost("h1"); return err }); err != nil {
			t.Fatal(err)
		}
		if h.AgentRun != "run-2" {
			t.Fatalf("host h1's agent run reads %q", h.AgentRun)
		}

		// Answered, a request is taken no more.
		if err := s.Update(ctx, func(tx *Tx) error { return tx.AnswerTransfer("h1", asked[1].ID, []byte("bundle"), "", "") }); err != nil {
			t.Fatal(err)
		}
		if err := take("h1", asked[1].ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("an answered request was taken: %v", err)
		}

		// An agent that names no run takes nothing from its watch.
		register("h1", "")
		if err := take("h1", asked[0].ID); err != nil {
			t.Fatal(err)
		}
		if got, want := handed("h1"), []string{asked[0].ID}; !slices.Equal(got, want) {
			t.Fatalf("an agent without a run is handed %v, want %v", got, want)
		}
	})
}
