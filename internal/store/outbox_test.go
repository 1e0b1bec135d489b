package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// enqueue queues one delivery per (instance, payload) pair, in order, in
// one transaction.
func enqueue(t testing.TB, s *Store, pairs ...string) {
	t.Helper()
	err := s.Update(context.Background(), func(tx *Tx) error {
		for i := 0; i < len(pairs); i += 2 {
			if err := tx.Enqueue(pairs[i], []byte(pairs[i+1])); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// claim claims up to limit deliveries for holder and returns their
// payloads.
func claim(t testing.TB, s *Store, holder string, lease time.Duration, limit int) ([]Delivery, []string) {
	t.Helper()
	var ds []Delivery
	if err := s.Update(context.Background(), func(tx *Tx) (err error) { ds, err = tx.ClaimDeliveries(holder, lease, limit); return err }); err != nil {
		t.Fatal(err)
	}
	var payloads []string
	for _, d := range ds {
		payloads = append(payloads, string(d.Payload))
	}
	return ds, payloads
}

// settle marks d delivered (or, with wait ≥ 0, retried after wait) for
// holder, and reports whether holder's claim still held.
func settle(t testing.TB, s *Store, d Delivery, holder string, wait time.Duration) bool {
	t.Helper()
	var held bool
	err := s.Update(context.Background(), func(tx *Tx) (err error) {
		if wait >= 0 {
			held, err = tx.Retry(d.ID, holder, wait)
		} else {
			held, err = tx.Delivered(d.ID, holder)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return held
}

const done = -1 // settle: delivered

// TestOutboxClaims: only the first waiting delivery of each instance can
// be claimed, by one holder at a time; a claim whose lease ran out is
// another's to take, and the first holder can then no longer settle it; a
// retry releases the claim and holds the instance's next delivery back.
func TestOutboxClaims(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		s, _ := open(t) // its clock ticks a second per transaction
		enqueue(t, s, "i-1", "a", "i-1", "b", "i-2", "c")

		ds, got := claim(t, s, "A", time.Hour, 10)
		if fmt.Sprint(got) != "[a c]" || ds[0].ClaimedBy != "A" || ds[0].DeliveryID == "" {
			t.Fatalf("A claimed %v (%+v); want the first of each instance, [a c]", got, ds)
		}
		a, c := ds[0], ds[1]
		if _, got := claim(t, s, "B", time.Hour, 10); len(got) != 0 {
			t.Fatalf("B claimed %v while A's claims hold and b waits behind a", got)
		}
		var next time.Time
		var ok bool
		s.View(context.Background(), func(tx *Tx) (err error) { next, ok, err = tx.NextClaim(); return err })
		if !ok || !next.Equal(a.ClaimedUntil) {
			t.Fatalf("next claim at %v (%v); want when A's claims run out, %v", next, ok, a.ClaimedUntil)
		}

		if !settle(t, s, a, "A", done) {
			t.Fatal("A's claim on a did not hold")
		}
		ds, got = claim(t, s, "B", time.Hour, 10)
		if fmt.Sprint(got) != "[b]" {
			t.Fatalf("B claimed %v once a was delivered; want [b]", got)
		}
		if settle(t, s, ds[0], "A", done) {
			t.Fatal("A settled B's claim")
		}
		if !settle(t, s, ds[0], "B", done) {
			t.Fatal("B's claim on b did not hold")
		}

		// A retry releases c, due after the wait; then a claim with a
		// lease that runs out at once is taken over.
		if !settle(t, s, c, "A", 0) {
			t.Fatal("A's claim on c did not hold")
		}
		enqueue(t, s, "i-2", "d")
		ds, got = claim(t, s, "A", time.Second, 10)
		if fmt.Sprint(got) != "[c]" || ds[0].Attempts != 1 || ds[0].DeliveryID != c.DeliveryID {
			t.Fatalf("A claimed %v (%+v) after retrying c; want c again, 1 attempt, the same delivery id", got, ds)
		}
		taken, got := claim(t, s, "B", time.Hour, 10) // a second later: A's lease is out
		if fmt.Sprint(got) != "[c]" {
			t.Fatalf("B claimed %v once A's lease on c ran out; want [c]", got)
		}
		if settle(t, s, ds[0], "A", done) || settle(t, s, ds[0], "A", 0) {
			t.Fatal("A settled c after B took it over")
		}
		if !settle(t, s, taken[0], "B", done) {
			t.Fatal("B's claim on c did not hold")
		}
		if _, got := claim(t, s, "B", time.Hour, 10); fmt.Sprint(got) != "[d]" {
			t.Fatalf("B claimed %v; want d, after c", got)
		}
	})
}

// TestOutboxClaimedByManyServers: several stores on one database (servers)
// claiming and settling at once, a few deliveries at a time, each claim
// in parallel with others: every delivery is claimed exactly once, and
// one of an instance only once the one before it was settled.
func TestOutboxClaimedByManyServers(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		first, reopen := open(t)
		const instances, each = 8, 25
		var pairs []string
		for n := range each {
			for i := range instances {
				pairs = append(pairs, fmt.Sprintf("i-%d", i), fmt.Sprint(n))
			}
		}
		enqueue(t, first, pairs...)

		var mu sync.Mutex
		claims := map[int64]int{}   // delivery → times claimed
		settled := map[string]int{} // instance → deliveries settled
		var wg sync.WaitGroup
		for server := range 2 {
			s, err := reopen()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			for worker := range 3 {
				holder := fmt.Sprintf("server-%d/%d", server, worker)
				wg.Go(func() {
					for !t.Failed() { // one worker's failure leaves its claims: the others would wait for ever
						var ds []Delivery
						var left bool
						err := s.Update(context.Background(), func(tx *Tx) (err error) {
							if ds, err = tx.ClaimDeliveries(holder, time.Hour, 3); err != nil || len(ds) > 0 {
								return err
							}
							_, left, err = tx.NextClaim()
							return err
						})
						if err != nil {
							t.Error(err)
							return
						}
						switch {
						case len(ds) == 0 && !left:
							return
						case len(ds) == 0: // claimed by others: wait for them
							time.Sleep(time.Millisecond)
						}
						for _, d := range ds {
							mu.Lock()
							claims[d.ID]++
							if want := fmt.Sprint(settled[d.InstanceID]); string(d.Payload) != want {
								t.Errorf("%s claimed %s's delivery %s with %d settled before it", holder, d.InstanceID, d.Payload, settled[d.InstanceID])
							}
							settled[d.InstanceID]++ // before it is: the next may not be claimed before
							mu.Unlock()
							var held bool
							err := s.Update(context.Background(), func(tx *Tx) (err error) { held, err = tx.Delivered(d.ID, holder); return err })
							if err != nil || !held {
								t.Errorf("%s settling %d: held %v, %v", holder, d.ID, held, err)
								return
							}
						}
					}
				})
			}
		}
		wg.Wait()
		if len(claims) != instances*each {
			t.Fatalf("%d deliveries claimed; want %d", len(claims), instances*each)
		}
		for id, n := range claims {
			if n != 1 {
				t.Errorf("delivery %d claimed %d times", id, n)
			}
		}
	})
}

// TestLeases: one holder at a time, renewed by its holder, another's once
// it expires; servers taking it at once get it once.
func TestLeases(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		s, reopen := open(t) // its clock ticks a second per transaction
		take := func(s *Store, holder string, ttl time.Duration) bool {
			t.Helper()
			var ok bool
			if err := s.Update(context.Background(), func(tx *Tx) (err error) { ok, err = tx.TakeLease("sweep", holder, ttl); return err }); err != nil {
				t.Fatal(err)
			}
			return ok
		}
		if err := s.View(context.Background(), func(tx *Tx) error { _, _, err := tx.LeaseHolder("sweep"); return err }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("the holder of a lease never taken: %v", err)
		}
		if !take(s, "A", time.Hour) || take(s, "B", time.Hour) || !take(s, "A", 2*time.Second) {
			t.Fatal("A did not take, and keep, the lease that B could not")
		}
		// A renewed for 2 s: two transactions later it has expired.
		if take(s, "B", time.Hour) || !take(s, "B", time.Hour) || take(s, "A", time.Hour) {
			t.Fatal("B did not take over the lease A let expire")
		}
		var holder string
		s.View(context.Background(), func(tx *Tx) (err error) { holder, _, err = tx.LeaseHolder("sweep"); return err })
		if holder != "B" {
			t.Fatalf("holder %q; want B", holder)
		}

		// Many at once, on two stores: one gets it.
		var mu sync.Mutex
		var winners []string
		var wg sync.WaitGroup
		for server := range 2 {
			other, err := reopen()
			if err != nil {
				t.Fatal(err)
			}
			defer other.Close()
			for worker := range 4 {
				holder := fmt.Sprintf("server-%d/%d", server, worker)
				wg.Go(func() {
					var ok bool
					if err := other.Update(context.Background(), func(tx *Tx) (err error) { ok, err = tx.TakeLease("race", holder, time.Hour); return err }); err != nil {
						t.Error(err)
					}
					if ok {
						mu.Lock()
						winners = append(winners, holder)
						mu.Unlock()
					}
				})
			}
		}
		wg.Wait()
		if len(winners) != 1 {
			t.Fatalf("the lease went to %v; want one holder", winners)
		}
	})
}
