package store

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

// unmigrated opens an empty database of each engine, with no schema, for
// tests that start from an older one (migrateTo).
var unmigrated = []struct {
	name string
	open func(t *testing.T) *Store
}{
	{"sqlite", func(t *testing.T) *Store {
		db, err := sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "vtpmd.db")+"?_pragma=foreign_keys(1)")
		if err != nil {
			t.Fatal(err)
		}
		s := &Store{db: db, now: testClock()}
		t.Cleanup(func() { s.Close() })
		return s
	}},
	{"postgres", func(t *testing.T) *Store {
		db, err := sql.Open("pgx", pgtest.DSN(t))
		if err != nil {
			t.Fatal(err)
		}
		s := &Store{db: db, now: testClock(), pg: true}
		t.Cleanup(func() { s.Close() })
		return s
	}},
}

// A database from before hosts' heartbeats and vTPMs' observed sockets:
// a host's last registration is its last heartbeat, of no known version,
// not drained; a vTPM has no sockets until its agent records them.
func TestMigrationKeepsHostsAndVTPMs(t *testing.T) {
	for _, e := range unmigrated {
		t.Run(e.name, func(t *testing.T) {
			ctx := context.Background()
			s := e.open(t)
			if err := s.migrateTo(ctx, 9); err != nil {
				t.Fatal(err)
			}
			var seen string
			err := s.Update(ctx, func(tx *Tx) error {
				seen = stamp(tx.now)
				if _, err := tx.exec(`INSERT INTO hosts (name, traits, capacity, backend, seen_at) VALUES ('h1', '["X"]', 10, 'swtpm', ?)`, seen); err != nil {
					return err
				}
				_, err := tx.exec(`INSERT INTO vtpms (instance_id, project, version, model, secret_security, hypervisor, keys, host,
					desired, phase, reason, secret_id, eks, generation, incarnation, created_at, updated_at)
					VALUES ('i-1', 'p1', '2.0', 'tpm-crb', 'user', '', '[]', 'h1', 'running', 'active', '', 's', '[]', 1, 'c1', ?, ?)`, seen, seen)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := s.migrate(ctx); err != nil {
				t.Fatal(err)
			}
			var h *Host
			var v *VTPM
			err = s.View(ctx, func(tx *Tx) (err error) {
				if h, err = tx.GetHost("h1"); err != nil {
					return err
				}
				v, err = tx.GetVTPM("i-1")
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if stamp(h.HeartbeatAt) != seen || h.Version != "" || h.Draining || h.Capacity != 10 || len(h.Traits) != 1 {
				t.Fatalf("host after the migration: %+v (seen at %s)", h, seen)
			}
			if v.Sockets != (Sockets{}) || v.Phase != PhaseActive || v.Incarnation != "c1" {
				t.Fatalf("vTPM after the migration: %+v", v)
			}
			if err := s.Update(ctx, func(tx *Tx) error { _, err := tx.SetDraining("h1", true); return err }); err != nil {
				t.Fatal(err)
			}
			if err := s.View(ctx, func(tx *Tx) (err error) { h, err = tx.GetHost("h1"); return err }); err != nil || !h.Draining {
				t.Fatalf("draining after the migration: %+v, %v", h, err)
			}
		})
	}
}

// A database from before watch revisions: its vTPMs are each host's
// revision 1, which a watcher starting over is given, and the next write
// there is revision 2.
func TestMigrationGivesWatchRevisions(t *testing.T) {
	for _, e := range unmigrated {
		t.Run(e.name, func(t *testing.T) {
			ctx := context.Background()
			s := e.open(t)
			if err := s.migrateTo(ctx, 12); err != nil {
				t.Fatal(err)
			}
			err := s.Update(ctx, func(tx *Tx) error {
				now := stamp(tx.now)
				if _, err := tx.exec(`INSERT INTO hosts (name, traits, capacity, backend, heartbeat_at) VALUES ('h1', '[]', 10, 'swtpm', ?), ('h2', '[]', 10, 'swtpm', ?)`, now, now); err != nil {
					return err
				}
				for _, id := range []string{"i-1", "i-2"} {
					_, err := tx.exec(`INSERT INTO vtpms (instance_id, project, version, model, secret_security, hypervisor, keys, host,
						desired, phase, reason, secret_id, eks, generation, incarnation, created_at, updated_at)
						VALUES (?, 'p1', '2.0', 'tpm-crb', 'user', '', '[]', 'h1', 'running', 'active', '', 's', '[]', 1, 'c1', ?, ?)`, id, now, now)
					if err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := s.migrate(ctx); err != nil {
				t.Fatal(err)
			}
			w := watcher{t, s}
			c := w.watch("h1", 0)
			if c.Revision != 1 || !c.Reset || len(c.VTPMs) != 2 || c.VTPMs[0].Revision != 1 {
				t.Fatalf("h1 after the migration: %+v", c)
			}
			if c := w.watch("h2", 0); c.Revision != 0 || len(c.VTPMs) != 0 {
				t.Fatalf("h2, with no vTPM, after the migration: %+v", c)
			}
			w.update("i-2", PhaseStopped)
			if c := w.watch("h1", 1); c.Reset || c.Revision != 2 || len(c.VTPMs) != 1 || c.VTPMs[0].InstanceID != "i-2" {
				t.Fatalf("a write after the migration: %+v", c)
			}
		})
	}
}

// Webhook deliveries queued before per-instance order and claims: each
// gets its own delivery id, belongs to no instance (so they keep the order
// they were queued in, among themselves), and can be claimed.
func TestMigrationGivesDeliveriesIDs(t *testing.T) {
	for _, e := range unmigrated {
		t.Run(e.name, func(t *testing.T) {
			ctx := context.Background()
			s := e.open(t)
			if err := s.migrateTo(ctx, 16); err != nil {
				t.Fatal(err)
			}
			err := s.Update(ctx, func(tx *Tx) error {
				_, err := tx.exec(`INSERT INTO outbox (payload, next_at, created_at) VALUES ('1', ?, ?), ('2', ?, ?)`,
					sortable(tx.now), stamp(tx.now), sortable(tx.now), stamp(tx.now))
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := s.migrate(ctx); err != nil {
				t.Fatal(err)
			}
			var ds []Delivery
			s.View(ctx, func(tx *Tx) (err error) { ds, err = tx.Deliveries(10); return err })
			if len(ds) != 2 || ds[0].DeliveryID == "" || ds[0].DeliveryID == ds[1].DeliveryID || ds[0].InstanceID != "" {
				t.Fatalf("deliveries after the migration: %+v", ds)
			}
			if _, got := claim(t, s, "A", time.Hour, 10); fmt.Sprint(got) != "[1]" {
				t.Fatalf("claimed %v; want the first queued alone", got)
			}
		})
	}
}
