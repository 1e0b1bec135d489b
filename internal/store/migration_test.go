package store

import (
	"context"
	"slices"
	"testing"
)

// TestListMigrations: the migrations from or to a host are listed, oldest
// first, without their bundles; others' are not.
func TestListMigrations(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1", "h2", "h3")
		moves := []Migration{
			{InstanceID: "i-1", Source: "h1", Target: "h2", Step: MigrationImporting, WasRunning: true, Generation: 4, Bundle: []byte("bundle")},
			{InstanceID: "i-2", Source: "h3", Target: "h1", Step: MigrationStopping},
			{InstanceID: "i-3", Source: "h2", Target: "h3", Step: MigrationCleaning},
		}
		for _, m := range moves {
			v := sample(m.InstanceID, "p1", m.Source)
			err := s.Update(ctx, func(tx *Tx) error {
				if err := tx.CreateVTPM(v); err != nil {
					return err
				}
				m.Incarnation, m.Actor = v.Incarnation, "test"
				return tx.StartMigration(&m)
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		list := func(host string) []Migration {
			t.Helper()
			var out []Migration
			if err := s.View(ctx, func(tx *Tx) (err error) { out, err = tx.ListMigrations(host); return err }); err != nil {
				t.Fatal(err)
			}
			return out
		}
		got := list("h1")
		ids := func(ms []Migration) (out []string) {
			for _, m := range ms {
				out = append(out, m.InstanceID)
			}
			return out
		}
		if !slices.Equal(ids(got), []string{"i-1", "i-2"}) {
			t.Fatalf("migrations of h1: %v", ids(got))
		}
		m := got[0]
		if m.Source != "h1" || m.Target != "h2" || m.Step != MigrationImporting || !m.WasRunning || m.Generation != 4 || m.Bundle != nil ||
			m.Incarnation == "" || m.Actor != "test" || m.StartedAt.IsZero() {
			t.Fatalf("listed: %+v", m)
		}
		if got := ids(list("h3")); !slices.Equal(got, []string{"i-2", "i-3"}) {
			t.Fatalf("migrations of h3: %v", got)
		}
		if got := list("h4"); len(got) != 0 {
			t.Fatalf("migrations of h4: %v", got)
		}
	})
}
