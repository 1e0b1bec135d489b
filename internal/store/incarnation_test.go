package store

import (
	"context"
	"errors"
	"slices"
	"testing"
)

// Each vTPM of an instance id is an incarnation of its own: its events,
// including those written in the transaction that deletes it, stay its
// own; the next vTPM of the id starts with no events and no attestation,
// and a read of the deleted one writes nothing over the new one.
func TestIncarnations(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1")
		old := sample("i-1", "p2", "h1")
		err := s.Update(ctx, func(tx *Tx) error {
			if err := tx.CreateVTPM(old); err != nil {
				return err
			}
			if err := tx.AppendEvent(Event{Actor: "api:p2", InstanceID: "i-1", Action: "created"}); err != nil {
				return err
			}
			return tx.PutAttestation(&Attestation{InstanceID: "i-1", Verdict: "untrusted", Reasons: []string{"p2's reason"}})
		})
		if err != nil {
			t.Fatal(err)
		}
		err = s.Update(ctx, func(tx *Tx) error {
			if err := tx.DeleteVTPM("i-1"); err != nil {
				return err
			}
			return tx.AppendEvent(Event{Actor: "agent:h1", InstanceID: "i-1", Action: "deleted"})
		})
		if err != nil {
			t.Fatal(err)
		}
		// The delete took the attestation with the record: the next vTPM
		// does not inherit it.
		v := sample("i-1", "p1", "h1")
		err = s.Update(ctx, func(tx *Tx) error {
			if err := tx.CreateVTPM(v); err != nil {
				return err
			}
			return tx.AppendEvent(Event{Actor: "api:p1", InstanceID: "i-1", Action: "created"})
		})
		if err != nil {
			t.Fatal(err)
		}
		if v.Incarnation == "" || old.Incarnation == "" || v.Incarnation == old.Incarnation {
			t.Fatalf("incarnations %q then %q", old.Incarnation, v.Incarnation)
		}
		var cur, was, all []Event
		err = s.View(ctx, func(tx *Tx) (err error) {
			if cur, err = tx.ListEvents("i-1", v.Incarnation); err != nil {
				return err
			}
			if was, err = tx.ListEvents("i-1", old.Incarnation); err != nil {
				return err
			}
			all, err = tx.ListAllEvents("i-1")
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		actors := func(evs []Event) (out []string) {
			for _, e := range evs {
				out = append(out, e.Actor+" "+e.Action+" "+e.Incarnation)
			}
			return out
		}
		if want := []string{"api:p1 created " + v.Incarnation}; !slices.Equal(actors(cur), want) {
			t.Errorf("the new vTPM's events: %q, want %q", actors(cur), want)
		}
		if want := []string{"api:p2 created " + old.Incarnation, "agent:h1 deleted " + old.Incarnation}; !slices.Equal(actors(was), want) {
			t.Errorf("the deleted vTPM's events: %q, want %q", actors(was), want)
		}
		if len(all) != 3 {
			t.Errorf("all events: %q", actors(all))
		}
		err = s.View(ctx, func(tx *Tx) error { _, err := tx.GetAttestation("i-1"); return err })
		if !errors.Is(err, ErrNotFound) {
			t.Errorf("the new vTPM's attestation: %v, want none", err)
		}

		// A stale read of the deleted vTPM has the same generation as the
		// new one, but not its incarnation: it writes nothing.
		if old.Generation != v.Generation {
			t.Fatalf("generations %d and %d: the test needs them equal", old.Generation, v.Generation)
		}
		old.Desired = DesiredDeleted
		if err := s.Update(ctx, func(tx *Tx) error { return tx.UpdateVTPM(old) }); !errors.Is(err, ErrNotFound) {
			t.Errorf("update from the deleted vTPM: %v, want ErrNotFound", err)
		}
		var got *VTPM
		if err := s.View(ctx, func(tx *Tx) (err error) { got, err = tx.GetVTPM("i-1"); return err }); err != nil || got.Project != "p1" || got.Desired != DesiredRunning {
			t.Errorf("the new vTPM after a stale update: %+v, %v", got, err)
		}
	})
}

// A database from before incarnations: each vTPM gets one, with its
// events from its last "created" on; what came before belongs to none,
// and the log stays append-only.
func TestMigrationGivesIncarnations(t *testing.T) {
	for _, e := range unmigrated {
		t.Run(e.name, func(t *testing.T) {
			ctx := context.Background()
			s := e.open(t)
			if err := s.migrateTo(ctx, 8); err != nil {
				t.Fatal(err)
			}
			err := s.Update(ctx, func(tx *Tx) error {
				if _, err := tx.exec(`INSERT INTO hosts (name, traits, capacity, backend, seen_at) VALUES ('h1', '[]', 10, 'swtpm', ?)`, stamp(tx.now)); err != nil {
					return err
				}
				for _, id := range []string{"i-1", "i-2"} {
					_, err := tx.exec(`INSERT INTO vtpms (instance_id, project, version, model, secret_security, hypervisor, keys, host,
						desired, phase, reason, secret_id, eks, generation, created_at, updated_at)
						VALUES (?, 'p1', '2.0', 'tpm-crb', 'user', '', '[]', 'h1', 'running', 'active', '', 's', '[]', 1, ?, ?)`,
						id, stamp(tx.now), stamp(tx.now))
					if err != nil {
						return err
					}
				}
				for _, ev := range [][2]string{
					{"i-1", "created"}, {"i-1", "p2's policy"}, {"i-1", "deleted"}, // an earlier vTPM, p2's
					{"i-1", "created"}, {"i-1", "started"},
					{"i-3", "created"}, {"i-3", "deleted"}, // no vTPM now
					{"host:h1", "attestation trusted"},
					{"i-2", "started"}, // no "created" kept
				} {
					if _, err := tx.exec(`INSERT INTO events (at, actor, instance_id, action, detail) VALUES (?, 'x', ?, ?, '')`,
						stamp(tx.now), ev[0], ev[1]); err != nil {
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
			var v1, v2 *VTPM
			got := map[string][]string{}
			err = s.View(ctx, func(tx *Tx) (err error) {
				if v1, err = tx.GetVTPM("i-1"); err != nil {
					return err
				}
				if v2, err = tx.GetVTPM("i-2"); err != nil {
					return err
				}
				for _, q := range [][2]string{{"i-1", v1.Incarnation}, {"i-1", ""}, {"i-2", v2.Incarnation}, {"i-2", ""}, {"i-3", ""}, {"host:h1", ""}} {
					evs, err := tx.ListEvents(q[0], q[1])
					if err != nil {
						return err
					}
					for _, e := range evs {
						got[q[0]+" "+q[1]] = append(got[q[0]+" "+q[1]], e.Action)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if len(v1.Incarnation) != 32 || len(v2.Incarnation) != 32 || v1.Incarnation == v2.Incarnation {
				t.Fatalf("incarnations %q and %q", v1.Incarnation, v2.Incarnation)
			}
			for key, want := range map[string][]string{
				"i-1 " + v1.Incarnation: {"created", "started"},
				"i-1 ":                  {"created", "p2's policy", "deleted"},
				"i-2 " + v2.Incarnation: nil,
				"i-2 ":                  {"started"},
				"i-3 ":                  {"created", "deleted"},
				"host:h1 ":              {"attestation trusted"},
			} {
				if !slices.Equal(got[key], want) {
					t.Errorf("events of %s: %q, want %q", key, got[key], want)
				}
			}
			err = s.Update(ctx, func(tx *Tx) error { _, err := tx.exec(`UPDATE events SET action='x'`); return err })
			if err == nil {
				t.Fatal("the log is not append-only after the migration")
			}
		})
	}
}
