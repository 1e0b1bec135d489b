package store

import (
	"context"
	"errors"
	"reflect"
	"slices"
	"testing"
	"time"
)

// The key broker's records: a secret per project and name, its releases
// upserted per instance, revoked all at once for an instance, and an
// agent told of each revocation once; a delete takes the releases along.
func TestBrokerRecords(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		sec := &BrokerSecret{Project: "p1", Name: "disk", KeyID: "k1", ReleaseTo: []string{"i-1", "i-2"}, MaxEvidenceAge: 90 * time.Second}
		if err := s.Update(ctx, func(tx *Tx) error { return tx.CreateBrokerSecret(sec) }); err != nil {
			t.Fatal(err)
		}
		other := &BrokerSecret{Project: "p2", Name: "disk", KeyID: "k2", Policy: "web", MaxEvidenceAge: time.Minute}
		if err := s.Update(ctx, func(tx *Tx) error { return tx.CreateBrokerSecret(other) }); err != nil {
			t.Fatal(err)
		}
		dup := *sec
		if err := s.Update(ctx, func(tx *Tx) error { return tx.CreateBrokerSecret(&dup) }); !errors.Is(err, ErrExists) {
			t.Fatalf("a second secret of the name: %v; want ErrExists", err)
		}
		var got *BrokerSecret
		var all []*BrokerSecret
		var keys []string
		s.View(ctx, func(tx *Tx) (err error) {
			if got, err = tx.GetBrokerSecret("p1", "disk"); err != nil {
				return err
			}
			if all, err = tx.ListBrokerSecrets(""); err != nil {
				return err
			}
			keys, err = tx.BrokerSecretKeys()
			return err
		})
		got.CreatedAt = sec.CreatedAt
		if !reflect.DeepEqual(got, sec) || len(all) != 2 || !slices.Equal(keys, []string{"k1", "k2"}) {
			t.Fatalf("read back %+v (want %+v), %d listed, keys %v", got, sec, len(all), keys)
		}

		release := func(instance string) {
			if err := s.Update(ctx, func(tx *Tx) error { return tx.RecordRelease("p1", "disk", instance, "inc") }); err != nil {
				t.Fatal(err)
			}
		}
		release("i-1")
		release("i-1")
		release("i-2")
		var revoked []Release
		var told, again []string
		err := s.Update(ctx, func(tx *Tx) (err error) { revoked, err = tx.RevokeReleases("i-1", "host untrusted"); return err })
		if err != nil || len(revoked) != 1 || revoked[0].Releases != 2 || revoked[0].Reason != "host untrusted" {
			t.Fatalf("revoking i-1: %+v %v", revoked, err)
		}
		s.Update(ctx, func(tx *Tx) (err error) { told, err = tx.TakeRevocations("i-1"); return err })
		s.Update(ctx, func(tx *Tx) (err error) { again, err = tx.TakeRevocations("i-1"); return err })
		if !slices.Equal(told, []string{"disk"}) || len(again) != 0 {
			t.Fatalf("told %v, then %v; want disk once", told, again)
		}
		var rs []Release
		s.View(ctx, func(tx *Tx) (err error) { rs, err = tx.ListReleases("p1", "disk"); return err })
		if len(rs) != 2 || rs[0].InstanceID != "i-1" || rs[0].RevokedAt.IsZero() || !rs[1].RevokedAt.IsZero() {
			t.Fatalf("releases %+v", rs)
		}
		release("i-1") // trusted again: it holds again
		s.View(ctx, func(tx *Tx) (err error) { rs, err = tx.ListReleases("p1", "disk"); return err })
		if !rs[0].RevokedAt.IsZero() || rs[0].Releases != 3 || rs[0].Reason != "" {
			t.Fatalf("released again: %+v", rs[0])
		}

		var deleted *BrokerSecret
		if err := s.Update(ctx, func(tx *Tx) (err error) { deleted, err = tx.DeleteBrokerSecret("p1", "disk"); return err }); err != nil || deleted.KeyID != "k1" {
			t.Fatalf("delete: %+v %v", deleted, err)
		}
		s.View(ctx, func(tx *Tx) (err error) { rs, err = tx.ListReleases("p1", "disk"); return err })
		if len(rs) != 0 {
			t.Fatalf("releases of a deleted secret: %+v", rs)
		}
		if err := s.Update(ctx, func(tx *Tx) (err error) { _, err = tx.DeleteBrokerSecret("p1", "disk"); return err }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("deleting again: %v", err)
		}
	})
}
