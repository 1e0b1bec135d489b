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
