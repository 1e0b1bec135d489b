package store

import (
	"context"
	"crypto/sha256"
	"errors"
	"testing"
	"time"
)

// The console's links and sessions, on both engines: found by their
// secret's hash and kind until they expire; a link is taken once; ending
// one ends it; ending a project's ends those alone, and ending all ends
// every one, links too.
func TestConsoleSessions(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		hash := func(secret string) []byte { h := sha256.Sum256([]byte(secret)); return h[:] }
		create := func(secret string, kind SessionKind, project string, ttl time.Duration) {
			t.Helper()
			err := s.Update(ctx, func(tx *Tx) error {
				return tx.CreateConsoleSession(&ConsoleSession{TokenHash: hash(secret), Kind: kind, Name: "ops", Project: project}, ttl)
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		get := func(secret string, kind SessionKind) (*ConsoleSession, error) {
			var cs *ConsoleSession
			err := s.View(ctx, func(tx *Tx) (err error) { cs, err = tx.GetConsoleSession(hash(secret)); return err })
			if err == nil && cs.Kind != kind {
				t.Fatalf("%s is a %s, not a %s", secret, cs.Kind, kind)
			}
			return cs, err
		}
		take := func(secret string, kind SessionKind) error {
			return s.Update(ctx, func(tx *Tx) error { _, err := tx.TakeConsoleSession(hash(secret), kind); return err })
		}
		create("link", SessionLink, "p1", time.Hour)
		if cs, err := get("link", SessionLink); err != nil || cs.Project != "p1" || cs.Name != "ops" || !cs.ExpiresAt.Equal(cs.CreatedAt.Add(time.Hour)) {
			t.Fatalf("the link: %+v %v", cs, err)
		}
		if err := take("link", SessionSigned); !errors.Is(err, ErrNotFound) {
			t.Fatalf("a link taken as a session: %v", err)
		}
		if err := take("link", SessionLink); err != nil {
			t.Fatal(err)
		}
		if err := take("link", SessionLink); !errors.Is(err, ErrNotFound) {
			t.Fatalf("a link taken twice: %v", err)
		}

		// Expiry: the clock ticks a second per transaction.
		create("short", SessionSigned, "", 3*time.Second)
		if _, err := get("short", SessionSigned); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			get("short", SessionSigned)
		}
		if _, err := get("short", SessionSigned); !errors.Is(err, ErrNotFound) {
			t.Fatalf("an expired session: %v", err)
		}

		// Ending one; a project's; all (the expired one is gone with
		// them, and not counted).
		for _, c := range []struct {
			secret, project string
		}{{"op-1", ""}, {"op-2", ""}, {"p1-1", "p1"}, {"p1-2", "p1"}, {"p2-1", "p2"}} {
			create(c.secret, SessionSigned, c.project, time.Hour)
		}
		if err := s.Update(ctx, func(tx *Tx) error { return tx.EndConsoleSession(hash("op-1")) }); err != nil {
			t.Fatal(err)
		}
		if _, err := get("op-1", SessionSigned); !errors.Is(err, ErrNotFound) {
			t.Fatalf("an ended session: %v", err)
		}
		var n int
		if err := s.Update(ctx, func(tx *Tx) (err error) { n, err = tx.EndConsoleSessions("p1"); return err }); err != nil || n != 2 {
			t.Fatalf("ending p1's: %d %v", n, err)
		}
		for secret, want := range map[string]bool{"op-2": true, "p1-1": false, "p1-2": false, "p2-1": true} {
			if _, err := get(secret, SessionSigned); (err == nil) != want {
				t.Fatalf("%s after p1's ended: %v", secret, err)
			}
		}
		create("link-2", SessionLink, "", time.Hour)
		if err := s.Update(ctx, func(tx *Tx) (err error) { n, err = tx.EndConsoleSessions(); return err }); err != nil || n != 3 {
			t.Fatalf("ending all: %d %v", n, err)
		}
		for _, secret := range []string{"op-2", "p2-1"} {
			if _, err := get(secret, SessionSigned); !errors.Is(err, ErrNotFound) {
				t.Fatalf("%s after all ended: %v", secret, err)
			}
		}
		if err := take("link-2", SessionLink); !errors.Is(err, ErrNotFound) {
			t.Fatalf("a link after all ended: %v", err)
		}
	})
}
