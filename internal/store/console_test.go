package store

import (
	"context"
	"fmt"
	"slices"
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
		err := s.Update(ctx, func(tx *Tx) error {
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
				if i%3 == 0 {
					a.PolicyName = "gold"
				}
				if err := tx.PutAttestation(a); err != nil {
					return err
				}
				if err := tx.AppendEvent(Event{Actor: "vtpmd", InstanceID: id, Action: "attestation " + string(a.Verdict)}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		list := func(q InstanceQuery) ([]string, int) {
			t.Helper()
			var page []Instance
			var total int
			if err := s.View(ctx, func(tx *Tx) (err error) { page, total, err = tx.ListInstances(q); return err }); err != nil {
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
		if ids, total := list(InstanceQuery{Verdict: VerdictNone}); total != 3 || !slices.Equal(ids, []string{"i-09:none", "i-10:none", "i-11:none"}) {
			t.Fatalf("never registered: %v of %d", ids, total)
		}
		// Sorted by verdict, descending (ties by id, descending too); paged.
		ids, total := list(InstanceQuery{Sort: SortVerdict, Desc: true, Offset: 2, Limit: 4})
		if total != 12 || !slices.Equal(ids, []string{"i-01:untrusted", "i-06:trusted", "i-03:trusted", "i-00:trusted"}) {
			t.Fatalf("by verdict, descending, 3rd to 6th: %v of %d", ids, total)
		}
		if ids, _ := list(InstanceQuery{Sort: SortEvidence, Limit: 2, Policy: "gold"}); !slices.Equal(ids, []string{"i-00:trusted", "i-03:trusted"}) {
			t.Fatalf("gold's by evidence: %v", ids)
		}
		if ids, total := list(InstanceQuery{Search: "i-1"}); total != 2 || !slices.Equal(ids, []string{"i-10:none", "i-11:none"}) {
			t.Fatalf("ids starting i-1: %v of %d", ids, total)
		}

		var phases, byVerdict, users []Count
		var changes map[time.Time]map[Verdict]int
		var gold []string
		err = s.View(ctx, func(tx *Tx) (err error) {
			if phases, err = tx.CountPhases("p2"); err != nil {
				return err
			}
			if byVerdict, err = tx.CountVerdicts(""); err != nil {
				return err
			}
			if users, err = tx.CountPolicyUsers("p1"); err != nil {
				return err
			}
			if gold, err = tx.ListPolicyUsers("", "gold", 2); err != nil {
				return err
			}
			changes, err = tx.VerdictChanges(time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(phases, []Count{{"pending", 6}}) ||
			!slices.Equal(byVerdict, []Count{{"pending", 3}, {"trusted", 3}, {"untrusted", 3}, {"none", 3}}) ||
			!slices.Equal(users, []Count{{"gold", 2}}) || !slices.Equal(gold, []string{"i-00", "i-03"}) {
			t.Fatalf("phases %v, verdicts %v, policy users %v %v", phases, byVerdict, users, gold)
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
