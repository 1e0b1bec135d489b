package store

import (
	"context"
	"errors"
	"reflect"
	"slices"
	"testing"
	"time"
)

// Attestations, policies, the webhook outbox, tenants' secrets and host
// credentials, on both engines.
func TestAttestationTables(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1")
		now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
		put := func(a *Attestation) {
			t.Helper()
			if err := s.Update(ctx, func(tx *Tx) error { return tx.PutAttestation(a) }); err != nil {
				t.Fatal(err)
			}
		}
		put(&Attestation{InstanceID: "i-1", Verdict: "trusted", PCRs: map[int][]byte{0: {1}}, StaleAt: now.Add(time.Minute)})
		put(&Attestation{InstanceID: HostKey("h1"), Verdict: "trusted", StaleAt: now.Add(-time.Minute)})
		put(&Attestation{InstanceID: "i-1", Verdict: "untrusted", StaleAt: now.Add(-time.Second)}) // replaces
		put(&Attestation{InstanceID: "i-2", Verdict: "pending"})                                   // no deadline
		var overdue []string
		var a *Attestation
		err := s.View(ctx, func(tx *Tx) (err error) {
			if overdue, err = tx.OverdueAttestations(now); err != nil {
				return err
			}
			a, err = tx.GetAttestation("i-1")
			return err
		})
		if err != nil || !slices.Equal(overdue, []string{HostKey("h1"), "i-1"}) || a.Verdict != "untrusted" || a.PCRs != nil {
			t.Fatalf("overdue %v, i-1 %+v, %v", overdue, a, err)
		}

		// Policies: per project, listed by project and name, unique.
		for _, p := range []*Policy{{Project: "", Name: "shared", PCRs: map[int][]byte{4: {4}}}, {Project: "p1", Name: "mine", Digests: map[int][][]byte{10: {{1}, {2}}}},
			{Project: "p2", Name: "theirs"}} {
			if err := s.Update(ctx, func(tx *Tx) error { return tx.CreatePolicy(p) }); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Update(ctx, func(tx *Tx) error { return tx.CreatePolicy(&Policy{Project: "p1", Name: "mine"}) }); !errors.Is(err, ErrExists) {
			t.Fatalf("a second policy of that name: %v", err)
		}
		var ps []*Policy
		var mine *Policy
		err = s.View(ctx, func(tx *Tx) (err error) {
			if ps, err = tx.ListPolicies("p1", ""); err != nil {
				return err
			}
			mine, err = tx.GetPolicy("p1", "mine")
			return err
		})
		if err != nil || len(ps) != 2 || ps[0].Name != "shared" || ps[1].Name != "mine" || len(mine.Digests[10]) != 2 || mine.CreatedAt.IsZero() {
			t.Fatalf("policies %+v, mine %+v, %v", ps, mine, err)
		}
		if err := s.Update(ctx, func(tx *Tx) error { return tx.DeletePolicy("p1", "mine") }); err != nil {
			t.Fatal(err)
		}
		if err := s.Update(ctx, func(tx *Tx) error { return tx.DeletePolicy("p1", "mine") }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("deleting twice: %v", err)
		}

		// The outbox: in order, retries later, delivered goes.
		err = s.Update(ctx, func(tx *Tx) error {
			for _, p := range []string{`{"n":1}`, `{"n":2}`} {
				if err := tx.Enqueue("i-"+p[5:6], []byte(p)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		var ds []Delivery
		s.View(ctx, func(tx *Tx) (err error) { ds, err = tx.Deliveries(10); return err })
		if len(ds) != 2 || string(ds[0].Payload) != `{"n":1}` || ds[0].InstanceID != "i-1" || ds[0].ID >= ds[1].ID || ds[0].DeliveryID == "" || ds[0].DeliveryID == ds[1].DeliveryID {
			t.Fatalf("deliveries %+v", ds)
		}
		s.Update(ctx, func(tx *Tx) (err error) { ds, err = tx.ClaimDeliveries("me", time.Hour, 10); return err })
		var held [2]bool
		s.Update(ctx, func(tx *Tx) (err error) { held[0], err = tx.Retry(ds[0].ID, "me", time.Hour); return err })
		s.Update(ctx, func(tx *Tx) (err error) { held[1], err = tx.Delivered(ds[1].ID, "me"); return err })
		id := ds[0].DeliveryID
		s.View(ctx, func(tx *Tx) (err error) { ds, err = tx.Deliveries(10); return err })
		if !held[0] || !held[1] || len(ds) != 1 || ds[0].Attempts != 1 || ds[0].DeliveryID != id || ds[0].ClaimedBy != "" || !ds[0].NextAt.After(time.Date(2026, 11, 22, 12, 59, 0, 0, time.UTC)) {
			t.Fatalf("after a retry and a delivery: %+v, held %v", ds, held)
		}

		// Tenants' secrets and host credentials.
		var project, host string
		var ids []string
		err = s.Update(ctx, func(tx *Tx) (err error) {
			if err = tx.AddSecret("s-1", "p1"); err != nil {
				return err
			}
			if err = tx.PutHostCredential("h1", []byte("old")); err != nil {
				return err
			}
			if err = tx.PutHostCredential("h1", []byte("new")); err != nil {
				return err
			}
			if project, err = tx.SecretProject("s-1"); err != nil {
				return err
			}
			if ids, err = tx.Secrets(); err != nil {
				return err
			}
			host, err = tx.HostByCredential([]byte("new"))
			return err
		})
		if err != nil || project != "p1" || !slices.Equal(ids, []string{"s-1"}) || host != "h1" {
			t.Fatalf("secret %q %v, credential of %q: %v", project, ids, host, err)
		}
		err = s.View(ctx, func(tx *Tx) error { _, err := tx.HostByCredential([]byte("old")); return err })
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("a replaced credential: %v", err)
		}
	})
}

// An attestation record's logs are kept apart from the rest of it: read
// back whole, left out by GetAttestationWithoutLogs (everything else
// read), and a record read without them is never written back.
func TestAttestationLogsApart(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		at := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
		in := &Attestation{InstanceID: "i-1", AKPublic: []byte{1, 2}, AgentTokenHash: []byte{3}, RegisteredAt: at, EvidenceAt: at,
			Verdict: VerdictTrusted, Reasons: []string{"r"}, PCRs: map[int][]byte{0: {9}}, PolicyName: "gold",
			EventLog: []byte("event log"), IMALog: []byte("ima log"), IMAEntries: 2, PolicyEventLog: []byte("policy's log")}
		if err := s.Update(ctx, func(tx *Tx) error { return tx.PutAttestation(in) }); err != nil {
			t.Fatal(err)
		}
		var whole, part *Attestation
		err := s.View(ctx, func(tx *Tx) (err error) {
			if whole, err = tx.GetAttestation("i-1"); err != nil {
				return err
			}
			part, err = tx.GetAttestationWithoutLogs("i-1")
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(whole, in) {
			t.Fatalf("read back %+v, want %+v", whole, in)
		}
		if part.EventLog != nil || part.IMALog != nil || part.PolicyEventLog != nil {
			t.Fatalf("read without logs: %q %q %q", part.EventLog, part.IMALog, part.PolicyEventLog)
		}
		lean := *in
		lean.EventLog, lean.IMALog, lean.PolicyEventLog = nil, nil, nil
		if part.withoutLogs = false; !reflect.DeepEqual(part, &lean) {
			t.Fatalf("read without logs %+v, want %+v", part, &lean)
		}
		part.withoutLogs = true
		if err := s.Update(ctx, func(tx *Tx) error { return tx.PutAttestation(part) }); err == nil {
			t.Fatal("a record read without its logs was written back")
		}
		if err := s.View(ctx, func(tx *Tx) error {
			_, err := tx.GetAttestationWithoutLogs("i-2")
			return err
		}); !errors.Is(err, ErrNotFound) {
			t.Fatalf("an absent record: %v", err)
		}

		// A vTPM with its record and its host's in one read, without
		// their logs; one with no record of its own reads nil for it.
		putHosts(t, s, "h1")
		host := &Attestation{InstanceID: HostKey("h1"), Verdict: VerdictUntrusted, Reasons: []string{"r"}, EventLog: []byte("host's log")}
		if err := s.Update(ctx, func(tx *Tx) error {
			for _, id := range []string{"i-1", "i-3"} {
				if err := tx.CreateVTPM(sample(id, "p1", "h1")); err != nil {
					return err
				}
			}
			if err := tx.PutAttestation(in); err != nil {
				return err
			}
			return tx.PutAttestation(host)
		}); err != nil {
			t.Fatal(err)
		}
		var v *VTPM
		var own, hosts *Attestation
		if err := s.View(ctx, func(tx *Tx) (err error) { v, own, hosts, err = tx.GetVTPMAttested("i-1"); return err }); err != nil {
			t.Fatal(err)
		}
		if v.InstanceID != "i-1" || v.Host != "h1" || own == nil || own.EventLog != nil || !own.withoutLogs || own.PolicyName != "gold" ||
			hosts == nil || hosts.InstanceID != HostKey("h1") || hosts.Verdict != VerdictUntrusted || hosts.EventLog != nil || !hosts.withoutLogs {
			t.Fatalf("read together: %+v, %+v, %+v", v, own, hosts)
		}
		if err := s.View(ctx, func(tx *Tx) (err error) { v, own, hosts, err = tx.GetVTPMAttested("i-3"); return err }); err != nil {
			t.Fatal(err)
		}
		if v.InstanceID != "i-3" || own != nil || hosts == nil {
			t.Fatalf("a vTPM with no record of its own: %+v, %+v, %+v", v, own, hosts)
		}
		if err := s.View(ctx, func(tx *Tx) error { _, _, _, err := tx.GetVTPMAttested("i-2"); return err }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("no vTPM: %v", err)
		}
	})
}
