package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
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
		s := newStore(db, false, testClock())
		t.Cleanup(func() { s.Close() })
		return s
	}},
	{"postgres", func(t *testing.T) *Store {
		db, err := sql.Open("pgx", pgtest.DSN(t))
		if err != nil {
			t.Fatal(err)
		}
		s := newStore(db, true, testClock())
		t.Cleanup(func() { s.Close() })
		return s
	}},
}

// putOldHost writes host's row as schemas 11 to 32 have it (PutHost
// writes today's).
func putOldHost(tx *Tx, host string) error {
	_, err := tx.exec(`INSERT INTO hosts (name, traits, capacity, backend, heartbeat_at) VALUES (?, '[]', 10, 'swtpm', '')`, host)
	return err
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

// A database from before every delete removed the vTPM's attestation: the
// records of instances with no vTPM go, so that no later vTPM of the id
// finds one; a vTPM's own and hosts' stay.
func TestMigrationDropsOrphanAttestations(t *testing.T) {
	for _, e := range unmigrated {
		t.Run(e.name, func(t *testing.T) {
			ctx := context.Background()
			s := e.open(t)
			if err := s.migrateTo(ctx, 16); err != nil {
				t.Fatal(err)
			}
			err := s.Update(ctx, func(tx *Tx) error {
				if err := putOldHost(tx, "h1"); err != nil {
					return err
				}
				// The row as schema 16 has it (CreateVTPM writes today's).
				if _, err := tx.exec(`INSERT INTO vtpms (instance_id, project, version, model, secret_security, hypervisor, keys, host,
					desired, phase, reason, secret_id, eks, generation, created_at, updated_at)
					VALUES ('i-1', 'p1', '2.0', 'tpm-crb', 'user', '', '[]', 'h1', 'running', 'active', '', '', '[]', 1, '', '')`); err != nil {
					return err
				}
				// The rows as schema 16 has them (PutAttestation writes
				// today's).
				for _, key := range []string{"i-1", "i-gone", HostKey("h1")} {
					if _, err := tx.exec(`INSERT INTO attestations (instance_id, doc, updated_at) VALUES (?, ?, '')`,
						key, `{"verdict":"trusted","policy_name":"gold"}`); err != nil {
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
			err = s.View(ctx, func(tx *Tx) error {
				for key, want := range map[string]bool{"i-1": true, "i-gone": false, HostKey("h1"): true} {
					if _, err := tx.GetAttestation(key); (err == nil) != want {
						t.Errorf("attestation of %s after the migration: %v, want kept %v", key, err, want)
					}
				}
				// Migration 29 copied the verdict and policy out of the
				// document.
				page, err := tx.ListInstances(InstanceQuery{Verdict: VerdictTrusted, Policy: "gold"})
				if err != nil || len(page) != 1 || page[0].InstanceID != "i-1" {
					t.Errorf("i-1 by its verdict and policy after the migrations: %v %v", page, err)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A database from before policies had an identity: each copy is matched
// to the policy its name finds from its project (its own, else the
// shared one) whose values are still the copy's, in the attestation
// record and on the vTPM's row; a copy of a policy since replaced names
// none.
func TestMigrationPolicyIdentity(t *testing.T) {
	for _, e := range unmigrated {
		t.Run(e.name, func(t *testing.T) {
			ctx := context.Background()
			s := e.open(t)
			if err := s.migrateTo(ctx, 29); err != nil {
				t.Fatal(err)
			}
			pcr0 := func(b byte) map[int][]byte { return map[int][]byte{0: {b}} }
			err := s.Update(ctx, func(tx *Tx) error {
				if err := putOldHost(tx, "h1"); err != nil {
					return err
				}
				// The rows as schema 29 has them.
				for _, p := range []*Policy{{Name: "gold", PCRs: pcr0(1)}, {Project: "p1", Name: "gold", PCRs: pcr0(2)}, {Name: "silver", PCRs: pcr0(3)}} {
					doc, _ := json.Marshal(p)
					if _, err := tx.exec(`INSERT INTO policies (project, name, doc, created_at) VALUES (?, ?, ?, '')`, p.Project, p.Name, string(doc)); err != nil {
						return err
					}
				}
				for _, v := range []struct{ id, project string }{{"i-1", "p1"}, {"i-2", "p1"}, {"i-3", "p2"}, {"i-4", "p1"}} {
					if _, err := tx.exec(`INSERT INTO vtpms (instance_id, project, version, model, secret_security, hypervisor, keys, host,
						desired, phase, reason, secret_id, eks, generation, created_at, updated_at)
						VALUES (?, ?, '2.0', 'tpm-crb', 'user', '', '[]', 'h1', 'running', 'active', '', '', '[]', 1, '', '')`, v.id, v.project); err != nil {
						return err
					}
				}
				for key, a := range map[string]*Attestation{
					"i-1":         {PolicyName: "gold", PolicyPCRs: pcr0(2)},   // p1's own
					"i-2":         {PolicyName: "gold", PolicyPCRs: pcr0(1)},   // the shared one, before p1 made its own
					"i-3":         {PolicyName: "gold", PolicyPCRs: pcr0(1)},   // the shared one
					"i-4":         {PolicyName: "silver", PolicyPCRs: pcr0(4)}, // a silver since replaced
					HostKey("h1"): {PolicyName: "gold", PolicyPCRs: pcr0(1)},
				} {
					a.Verdict = VerdictTrusted
					doc, _ := json.Marshal(a)
					if _, err := tx.exec(`INSERT INTO attestations (instance_id, doc, updated_at) VALUES (?, ?, '')`, key, string(doc)); err != nil {
						return err
					}
					if _, err := tx.exec(`UPDATE vtpms SET verdict='trusted', policy_name=? WHERE instance_id=?`, a.PolicyName, key); err != nil {
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
			err = s.View(ctx, func(tx *Tx) error {
				shared, err := tx.GetPolicy("", "gold")
				if err != nil {
					return err
				}
				own, err := tx.GetPolicy("p1", "gold")
				if err != nil {
					return err
				}
				silver, err := tx.GetPolicy("", "silver")
				if err != nil {
					return err
				}
				if len(shared.ID) != 32 || len(own.ID) != 32 || own.ID == shared.ID || silver.ID == shared.ID || silver.ID == own.ID {
					t.Errorf("policy ids: %q %q %q", shared.ID, own.ID, silver.ID)
				}
				for key, want := range map[string]string{"i-1": own.ID, "i-2": shared.ID, "i-3": shared.ID, "i-4": "", HostKey("h1"): shared.ID} {
					a, err := tx.GetAttestation(key)
					if err != nil {
						return err
					}
					if a.PolicyID != want || a.PolicyName == "" || a.Verdict != VerdictTrusted || string(a.PolicyPCRs[0]) == "" {
						t.Errorf("%s's record after the migration: policy %q (%s), want %q; %+v", key, a.PolicyID, a.PolicyName, want, a)
					}
				}
				for id, want := range map[string][]string{shared.ID: {"i-2", "i-3"}, own.ID: {"i-1"}, silver.ID: nil} {
					page, err := tx.ListInstances(InstanceQuery{PolicyID: id})
					if err != nil {
						return err
					}
					var got []string
					for _, in := range page {
						got = append(got, in.InstanceID)
					}
					if !slices.Equal(got, want) {
						t.Errorf("instances of policy %s after the migration: %v, want %v", id, got, want)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// Replicas starting together on an empty database: each migration is
// applied once (the advisory lock on PostgreSQL, SQLite's write lock), and
// every store opens and works.
func TestConcurrentMigrations(t *testing.T) {
	for _, e := range []struct {
		name string
		open func(t *testing.T) func() (*Store, error)
	}{
		{"sqlite", func(t *testing.T) func() (*Store, error) {
			path := filepath.Join(t.TempDir(), "vtpmd.db")
			return func() (*Store, error) { return Open(context.Background(), path, Options{}) }
		}},
		{"postgres", func(t *testing.T) func() (*Store, error) {
			dsn := pgtest.DSN(t)
			return func() (*Store, error) { return OpenPostgres(context.Background(), dsn, Options{}) }
		}},
	} {
		t.Run(e.name, func(t *testing.T) {
			open := e.open(t)
			const replicas = 4
			stores := make([]*Store, replicas)
			errs := make([]error, replicas)
			start := make(chan struct{})
			var wg sync.WaitGroup
			for i := range stores {
				wg.Go(func() {
					<-start
					stores[i], errs[i] = open()
				})
			}
			close(start)
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Fatalf("replica %d: %v", i, err)
				}
				t.Cleanup(func() { stores[i].Close() })
			}
			var rows, distinct, top int
			if err := stores[0].db.QueryRow(`SELECT COUNT(*), COUNT(DISTINCT version), MAX(version) FROM schema_version`).Scan(&rows, &distinct, &top); err != nil {
				t.Fatal(err)
			}
			if rows != distinct || top != len(migrations)-1 {
				t.Fatalf("schema_version: %d rows, %d versions, up to %d; want each of 1..%d once", rows, distinct, top, len(migrations)-1)
			}
			for i, s := range stores {
				if err := s.SchemaCurrent(context.Background()); err != nil {
					t.Errorf("replica %d: %v", i, err)
				}
				if err := s.Update(context.Background(), func(tx *Tx) error {
					return tx.PutHost(&Host{Name: fmt.Sprint("h", i), Traits: []string{}, Capacity: 1, Backend: "swtpm"})
				}); err != nil {
					t.Errorf("replica %d writes: %v", i, err)
				}
			}
		})
	}
}

// A database a newer vtpmd migrated is refused at open, with an error that
// says so; one that lacks migrations reads not current.
func TestSchemaVersionChecks(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, reopen := open(t)
		newer := len(migrations) + 2
		if _, err := s.db.ExecContext(ctx, fmt.Sprintf(`INSERT INTO schema_version (version) VALUES (%d)`, newer)); err != nil {
			t.Fatal(err)
		}
		if err := s.SchemaCurrent(ctx); !errors.Is(err, ErrSchemaNewer) {
			t.Fatalf("SchemaCurrent = %v, want ErrSchemaNewer", err)
		}
		again, err := reopen()
		if err == nil {
			again.Close()
		}
		if !errors.Is(err, ErrSchemaNewer) || !strings.Contains(err.Error(), fmt.Sprint("schema version ", newer)) {
			t.Fatalf("opening a newer schema = %v, want ErrSchemaNewer naming version %d", err, newer)
		}
		t.Logf("error: %v", err)
	})
	for _, e := range unmigrated {
		t.Run("older/"+e.name, func(t *testing.T) {
			s := e.open(t)
			if err := s.migrateTo(context.Background(), 9); err != nil {
				t.Fatal(err)
			}
			if err := s.SchemaCurrent(context.Background()); !errors.Is(err, ErrSchemaOlder) {
				t.Fatalf("SchemaCurrent of a schema at 9 = %v, want ErrSchemaOlder", err)
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

// Migration 26 rebuilds the vtpms table (a vTPM may have no host once
// shelved): every column a vTPM had before comes through, a pending
// resize's included.
func TestMigrationRebuildKeepsVTPMs(t *testing.T) {
	for _, e := range unmigrated {
		t.Run(e.name, func(t *testing.T) {
			ctx := context.Background()
			s := e.open(t)
			if err := s.migrateTo(ctx, 25); err != nil {
				t.Fatal(err)
			}
			const resize = `{"status":"resized","kind":"keep"}`
			err := s.Update(ctx, func(tx *Tx) error {
				now := stamp(tx.now)
				if _, err := tx.exec(`INSERT INTO hosts (name, traits, capacity, backend, heartbeat_at) VALUES ('h1', '[]', 10, 'swtpm', ?)`, now); err != nil {
					return err
				}
				_, err := tx.exec(`INSERT INTO vtpms (instance_id, project, version, model, secret_security, hypervisor, keys, host,
					desired, phase, reason, secret_id, eks, generation, incarnation, created_at, updated_at,
					domain, data_socket, ctrl_socket, revision, swtpm_pid, guest_connected, resize)
					VALUES ('i-1', 'p1', '2.0', 'tpm-crb', 'host', '', '[]', 'h1', 'running', 'active', 'r', 's-1', '[]', 7, 'c1', ?, ?,
					'dom-1', '/run/d.sock', '/run/c.sock', 3, 4242, 1, ?)`, now, now, resize)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := s.migrate(ctx); err != nil {
				t.Fatal(err)
			}
			var v *VTPM
			var raw string
			err = s.View(ctx, func(tx *Tx) (err error) {
				if v, err = tx.GetVTPM("i-1"); err != nil {
					return err
				}
				return tx.queryRow(`SELECT resize FROM vtpms WHERE instance_id = 'i-1'`).Scan(&raw)
			})
			if err != nil {
				t.Fatal(err)
			}
			if v.Host != "h1" || v.Project != "p1" || v.Spec.SecretSecurity != "host" || v.SecretID != "s-1" || v.Generation != 7 ||
				v.Incarnation != "c1" || v.Domain != "dom-1" || v.Sockets.Data != "/run/d.sock" || v.Sockets.Ctrl != "/run/c.sock" ||
				v.Revision != 3 || v.PID != 4242 || !v.Connected || v.Reason != "r" || v.Resize == nil || raw != resize {
				t.Fatalf("after the rebuild: %+v (resize %q)", v, raw)
			}
		})
	}
}

// A database from before an attestation record's logs were kept apart:
// migration 30 moves them out of the document, so that both reads find
// what the record held.
func TestMigrationMovesAttestationLogs(t *testing.T) {
	for _, e := range unmigrated {
		t.Run(e.name, func(t *testing.T) {
			ctx := context.Background()
			s := e.open(t)
			if err := s.migrateTo(ctx, 29); err != nil {
				t.Fatal(err)
			}
			// The rows as schema 29 has them: the logs in the document
			// (base64, as encoding/json writes bytes), or none.
			err := s.Update(ctx, func(tx *Tx) error {
				for key, doc := range map[string]string{
					HostKey("h1"): `{"verdict":"trusted","pcrs":{"0":"CQ=="},"event_log":"ZXZlbnQgbG9n","ima_log":"aW1hIGxvZw==","ima_entries":2,"policy_event_log":"cG9saWN5","policy_name":"gold"}`,
					HostKey("h2"): `{"verdict":"pending"}`,
				} {
					if _, err := tx.exec(`INSERT INTO attestations (instance_id, doc, updated_at) VALUES (?, ?, '')`, key, doc); err != nil {
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
			err = s.View(ctx, func(tx *Tx) error {
				a, err := tx.GetAttestation(HostKey("h1"))
				if err != nil {
					return err
				}
				if string(a.EventLog) != "event log" || string(a.IMALog) != "ima log" || string(a.PolicyEventLog) != "policy" ||
					a.Verdict != VerdictTrusted || a.IMAEntries != 2 || a.PolicyName != "gold" || string(a.PCRs[0]) != "\x09" {
					t.Errorf("h1 after the migration: %+v", a)
				}
				var doc string
				if err := tx.queryRow(`SELECT doc FROM attestations WHERE instance_id=?`, HostKey("h1")).Scan(&doc); err != nil {
					return err
				}
				if strings.Contains(doc, "log") {
					t.Errorf("h1's document still holds a log: %s", doc)
				}
				if a, err = tx.GetAttestation(HostKey("h2")); err != nil || a.EventLog != nil || a.Verdict != VerdictPending {
					t.Errorf("h2 after the migration: %+v, %v", a, err)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// Migration 32: a broker secret made for a named policy names the policy
// its name found (the project's own, else the shared one).
func TestMigrationBrokerSecretPolicyIdentity(t *testing.T) {
	for _, e := range unmigrated {
		t.Run(e.name, func(t *testing.T) {
			ctx := context.Background()
			s := e.open(t)
			if err := s.migrateTo(ctx, 31); err != nil {
				t.Fatal(err)
			}
			err := s.Update(ctx, func(tx *Tx) error {
				for _, p := range []*Policy{{Name: "gold"}, {Project: "p1", Name: "gold"}} {
					if err := tx.CreatePolicy(p); err != nil {
						return err
					}
				}
				for _, sec := range []struct{ project, name, policy string }{{"p1", "a", "gold"}, {"p2", "b", "gold"}, {"p1", "c", ""}, {"p1", "d", "gone"}} {
					if _, err := tx.exec(`INSERT INTO broker_secrets (project, name, key_id, release_to, policy, max_evidence_age, created_at)
						VALUES (?, ?, 'k', '[]', ?, 1000, '')`, sec.project, sec.name, sec.policy); err != nil {
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
			err = s.View(ctx, func(tx *Tx) error {
				shared, err := tx.GetPolicy("", "gold")
				if err != nil {
					return err
				}
				own, err := tx.GetPolicy("p1", "gold")
				if err != nil {
					return err
				}
				for _, c := range []struct{ project, name, want string }{{"p1", "a", own.ID}, {"p2", "b", shared.ID}, {"p1", "c", ""}, {"p1", "d", ""}} {
					sec, err := tx.GetBrokerSecret(c.project, c.name)
					if err != nil {
						return err
					}
					if sec.PolicyID != c.want {
						t.Errorf("secret %s/%s: policy id %q, want %q", c.project, c.name, sec.PolicyID, c.want)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A database from before agents took transfers: its hosts name no agent
// run and its requests are taken by none, so the watch hands them as
// before.
func TestMigrationTransfersUntaken(t *testing.T) {
	for _, e := range unmigrated {
		t.Run(e.name, func(t *testing.T) {
			ctx := context.Background()
			s := e.open(t)
			if err := s.migrateTo(ctx, 32); err != nil {
				t.Fatal(err)
			}
			err := s.Update(ctx, func(tx *Tx) error {
				if err := putOldHost(tx, "h1"); err != nil {
					return err
				}
				_, err := tx.exec(`INSERT INTO state_transfers (id, host, instance_id, incarnation, kind, generation, bundle, answered, code, message, asked_at)
					VALUES ('x1', 'h1', 'i-1', 'a', 'send', 0, ?, 0, '', '', '')`, []byte{})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := s.migrate(ctx); err != nil {
				t.Fatal(err)
			}
			err = s.View(ctx, func(tx *Tx) error {
				h, err := tx.GetHost("h1")
				if err != nil {
					return err
				}
				ch, err := tx.WatchVTPMs("h1", 0)
				if err != nil {
					return err
				}
				if h.AgentRun != "" || len(ch.Transfers) != 1 || ch.Transfers[0].ID != "x1" || ch.Transfers[0].TakenBy != "" {
					t.Errorf("after the migration: host's agent run %q, handed %+v", h.AgentRun, ch.Transfers)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}
