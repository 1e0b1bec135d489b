package store

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// The console's reads, on both engines: pages of instances filtered and
// sorted by their verdicts, counts, verdict changes by hour, and
// FleetChanged waking at a vTPM's write and at an event.
func TestConsoleReads(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1", "h2")
		verdicts := []Verdict{VerdictTrusted, VerdictUntrusted, VerdictPending}
		// Two policies named gold: the shared one, and p1's own.
		shared, own := &Policy{Name: "gold", PCRs: map[int][]byte{0: {1}}}, &Policy{Project: "p1", Name: "gold", PCRs: map[int][]byte{0: {2}}}
		err := s.Update(ctx, func(tx *Tx) error {
			if err := tx.CreatePolicy(shared); err != nil {
				return err
			}
			if err := tx.CreatePolicy(own); err != nil {
				return err
			}
			for i := range 12 {
				id := fmt.Sprintf("i-%02d", i)
				project, host := "p1", "h1"
				if i%2 == 1 {
					project, host = "p2", "h2"
				}
				if err := tx.CreateVTPM(sample(id, project, host)); err != nil {
					return err
				}
				if i >= 9 { // i-09, i-10, i-11 never register
					continue
				}
				a := &Attestation{InstanceID: id, Verdict: verdicts[i%3], EvidenceAt: time.Date(2026, 12, 1, 0, i, 0, 0, time.UTC)}
				if i%3 == 0 { // i-00 and i-03 copied the shared gold, i-06 p1's
					a.PolicyName, a.PolicyID = "gold", shared.ID
					if i == 6 {
						a.PolicyID = own.ID
					}
				}
				if err := tx.PutAttestation(a); err != nil {
					return err
				}
				if err := tx.AppendEvent(Event{Actor: "vtpmd", InstanceID: id, Action: "attestation " + string(a.Verdict)}); err != nil {
					return err
				}
			}
			// i-12 is shelved: on no host.
			return tx.CreateVTPM(sample("i-12", "p1", ""))
		})
		if err != nil {
			t.Fatal(err)
		}
		list := func(q InstanceQuery) ([]string, int) {
			t.Helper()
			var page []Instance
			var total int
			err := s.View(ctx, func(tx *Tx) (err error) {
				if total, err = tx.CountInstances(q); err != nil {
					return err
				}
				page, err = tx.ListInstances(q)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for _, in := range page {
				ids = append(ids, in.InstanceID+":"+string(in.Verdict))
			}
			return ids, total
		}
		if ids, total := list(InstanceQuery{Project: "p1", Verdict: VerdictUntrusted}); total != 1 || !slices.Equal(ids, []string{"i-04:untrusted"}) {
			t.Fatalf("p1's untrusted: %v of %d", ids, total)
		}
		if ids, total := list(InstanceQuery{Verdict: VerdictNone}); total != 4 || !slices.Equal(ids, []string{"i-09:none", "i-10:none", "i-11:none", "i-12:none"}) {
			t.Fatalf("never registered: %v of %d", ids, total)
		}
		if ids, _ := list(InstanceQuery{Sort: SortEvidence, Limit: 2, Policy: "gold"}); !slices.Equal(ids, []string{"i-00:trusted", "i-03:trusted"}) {
			t.Fatalf("gold's by evidence: %v", ids)
		}
		// The key at an offset is the filter's: p2's second by id is i-03.
		err = s.View(ctx, func(tx *Tx) error {
			k, err := tx.InstanceKeyAt(InstanceQuery{Project: "p2", Limit: 1, After: &InstanceKey{InstanceID: "i-09"}}, 1)
			if err == nil && k.InstanceID != "i-03" {
				err = fmt.Errorf("p2's second: %v", k)
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if ids, total := list(InstanceQuery{Search: "i-1"}); total != 3 || !slices.Equal(ids, []string{"i-10:none", "i-11:none", "i-12:none"}) {
			t.Fatalf("ids starting i-1: %v of %d", ids, total)
		}

		// Pages by place, every sort both ways: walking forward (After the
		// last row) and back (Before the first) meets every instance once,
		// in the order of one list of them all, the shelved one (no host)
		// included.
		for sort := range sortColumns {
			for _, desc := range []bool{false, true} {
				q := InstanceQuery{Sort: sort, Desc: desc}
				all, total := list(q)
				if len(all) != 13 || total != 13 {
					t.Fatalf("by %s: %v of %d", sort, all, total)
				}
				// The key at each offset is that row's, and the page after
				// it starts at the next row: page N without the pages
				// before. Past the end, none.
				for offset := range 14 {
					var k InstanceKey
					var page []Instance
					err := s.View(ctx, func(tx *Tx) (err error) {
						if k, err = tx.InstanceKeyAt(q, offset); err != nil {
							return err
						}
						page, err = tx.ListInstances(InstanceQuery{Sort: sort, Desc: desc, After: &k, Limit: 2})
						return err
					})
					if offset == 13 {
						if !errors.Is(err, ErrNotFound) {
							t.Fatalf("by %s (desc %v), the key past the end: %v %v", sort, desc, k, err)
						}
						continue
					}
					if err != nil {
						t.Fatal(err)
					}
					if !strings.HasPrefix(all[offset], k.InstanceID+":") {
						t.Fatalf("by %s (desc %v), the key at %d: %v, want %s's", sort, desc, offset, k, all[offset])
					}
					if want := all[offset+1 : min(offset+3, 13)]; len(page) != len(want) || (len(page) > 0 && !strings.HasPrefix(want[0], page[0].InstanceID+":")) {
						t.Fatalf("by %s (desc %v), the page after offset %d: %v, want %v", sort, desc, offset, page, want)
					}
				}
				var pages [][]Instance
				q.Limit = 4
				for {
					var page []Instance
					if err := s.View(ctx, func(tx *Tx) (err error) { page, err = tx.ListInstances(q); return err }); err != nil {
						t.Fatal(err)
					}
					if len(page) == 0 {
						break
					}
					pages = append(pages, page)
					q.After = &page[len(page)-1].Key
				}
				var forward []string
				for _, p := range pages {
					for _, in := range p {
						forward = append(forward, in.InstanceID+":"+string(in.Verdict))
					}
				}
				if !slices.Equal(forward, all) {
					t.Fatalf("by %s (desc %v), page by page: %v, want %v", sort, desc, forward, all)
				}
				// Back from the last page: each page before is the one
				// walked forward.
				q.After = nil
				for i := len(pages) - 1; i > 0; i-- {
					q.Before = &pages[i][0].Key
					var page []Instance
					if err := s.View(ctx, func(tx *Tx) (err error) { page, err = tx.ListInstances(q); return err }); err != nil {
						t.Fatal(err)
					}
					if len(page) != len(pages[i-1]) || page[0].InstanceID != pages[i-1][0].InstanceID || page[len(page)-1].InstanceID != pages[i-1][len(page)-1].InstanceID {
						t.Fatalf("by %s (desc %v), the page before page %d: %v", sort, desc, i+1, page)
					}
				}
			}
		}
		// Sorted by verdict, descending, ties by id descending too.
		if ids, _ := list(InstanceQuery{Sort: SortVerdict, Desc: true, Limit: 6}); !slices.Equal(ids, []string{"i-07:untrusted", "i-04:untrusted", "i-01:untrusted", "i-06:trusted", "i-03:trusted", "i-00:trusted"}) {
			t.Fatalf("by verdict, descending: %v", ids)
		}

		var phases, byVerdict, users, p1Users []Count
		var changes map[time.Time]map[Verdict]int
		var gold []string
		err = s.View(ctx, func(tx *Tx) (err error) {
			if phases, err = tx.CountPhases("p2"); err != nil {
				return err
			}
			if byVerdict, err = tx.CountVerdicts(""); err != nil {
				return err
			}
			if users, err = tx.CountPolicyUsers(""); err != nil {
				return err
			}
			if p1Users, err = tx.CountPolicyUsers("p1"); err != nil {
				return err
			}
			if gold, err = tx.ListPolicyUsers("", shared.ID, 5); err != nil {
				return err
			}
			changes, err = tx.VerdictChanges(time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		byID := func(cs ...Count) []Count {
			slices.SortFunc(cs, func(a, b Count) int { return strings.Compare(a.Value, b.Value) })
			return cs
		}
		if !slices.Equal(phases, []Count{{"pending", 6}}) ||
			!slices.Equal(byVerdict, []Count{{"pending", 3}, {"trusted", 3}, {"untrusted", 3}, {"none", 4}}) ||
			!slices.Equal(users, byID(Count{shared.ID, 2}, Count{own.ID, 1})) || !slices.Equal(p1Users, byID(Count{shared.ID, 1}, Count{own.ID, 1})) ||
			!slices.Equal(gold, []string{"i-00", "i-03"}) {
			t.Fatalf("phases %v, verdicts %v, policy users %v, p1's %v, the shared gold's %v", phases, byVerdict, users, p1Users, gold)
		}
		if ids, total := list(InstanceQuery{PolicyID: own.ID}); total != 1 || !slices.Equal(ids, []string{"i-06:trusted"}) {
			t.Fatalf("p1's gold's: %v of %d", ids, total)
		}
		// The shared gold deleted and made again: another policy, which no
		// instance copied.
		again := &Policy{Name: "gold", PCRs: map[int][]byte{0: {1}}}
		err = s.Update(ctx, func(tx *Tx) error {
			if err := tx.DeletePolicy("", "gold"); err != nil {
				return err
			}
			if err := tx.CreatePolicy(again); err != nil {
				return err
			}
			users, err = tx.CountPolicyUsers("")
			return err
		})
		if err != nil || again.ID == shared.ID || !slices.Equal(users, byID(Count{shared.ID, 2}, Count{own.ID, 1})) {
			t.Fatalf("after gold was made again (%s, was %s): %v %v", again.ID, shared.ID, users, err)
		}
		var counted int
		for _, by := range changes {
			counted += by[VerdictTrusted] + by[VerdictUntrusted] + by[VerdictPending]
		}
		if counted != 9 {
			t.Fatalf("verdict changes %v", changes)
		}

		// FleetChanged: a vTPM's write, an event.
		for _, change := range []func(tx *Tx) error{
			func(tx *Tx) error { return tx.AppendEvent(Event{Actor: "t", InstanceID: "i-00", Action: "x"}) },
			func(tx *Tx) error {
				v, err := tx.GetVTPM("i-01")
				if err != nil {
					return err
				}
				v.Phase = PhaseActive
				return tx.UpdateVTPM(v)
			},
		} {
			woken := s.FleetChanged()
			if err := s.Update(ctx, change); err != nil {
				t.Fatal(err)
			}
			select {
			case <-woken:
			case <-time.After(10 * time.Second):
				t.Fatal("FleetChanged did not wake at the commit")
			}
		}
	})
}
