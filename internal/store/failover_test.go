package store

import (
	"context"
	"database/sql"
	"errors"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

// TestPostgresFailover crashes the primary of a primary and hot standby
// under two stores opened with the deployment guide's DSN (both servers,
// the primary first, target_session_attrs=read-write): while no server
// takes writes every transaction fails with ErrUnavailable, none is sent
// to the read-only standby; once the standby is promoted the same stores
// serve again by themselves, with what the standby had replayed before
// the crash, and their listeners follow it: the reconnect wakes every
// waiter once, and one store's commit wakes the other's waiters.
func TestPostgresFailover(t *testing.T) {
	pg := pgtest.NewReplicated(t)
	dsn := pg.DSN(pg.Primary, pg.Standby)
	ctx := context.Background()
	open := func() *Store {
		s, err := OpenPostgres(ctx, dsn, Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		listening(t, s)
		return s
	}
	a, b := open(), open()
	putHosts(t, a, "h1")
	if err := a.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample("i-1", "p1", "h1")) }); err != nil {
		t.Fatal(err)
	}
	pg.CatchUp(t)
	missed := b.VTPMChanged("i-7") // no commit changes i-7: only the reconnect wakes it

	pg.Primary.Stop(t)
	create := func(tx *Tx) error { return tx.CreateVTPM(sample("i-2", "p1", "h1")) }
	for name, err := range map[string]error{
		"Update": a.Update(ctx, create),
		"View":   b.View(ctx, func(tx *Tx) error { _, err := tx.GetVTPM("i-1"); return err }),
	} {
		var ue *UnavailableError
		if !errors.Is(err, ErrUnavailable) || !errors.As(err, &ue) || ue.MaybeCommitted() {
			t.Fatalf("%s with the primary down and the standby not promoted: %v, want ErrUnavailable, not committing", name, err)
		}
	}
	pg.Promote(t)

	if err := a.Update(ctx, create); err != nil {
		t.Fatalf("the first transaction after the standby was promoted: %v", err)
	}
	select {
	case <-missed:
	case <-time.After(30 * time.Second):
		t.Fatal("the listener did not reconnect to the promoted standby, or woke no one when it did")
	}
	woken := b.VTPMChanged("i-3")
	if err := a.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample("i-3", "p1", "h1")) }); err != nil {
		t.Fatal(err)
	}
	select {
	case <-woken:
	case <-time.After(30 * time.Second):
		t.Fatal("after the failover, another store's commit did not wake a waiter")
	}
	var vs []*VTPM
	if err := b.View(ctx, func(tx *Tx) (err error) { vs, err = tx.ListVTPMs(Filter{}); return err }); err != nil {
		t.Fatal(err)
	}
	if len(vs) != 3 || vs[0].InstanceID != "i-1" || vs[1].InstanceID != "i-2" || vs[2].InstanceID != "i-3" {
		t.Fatalf("after the failover the store holds %d vTPMs, want i-1 (from before the crash), i-2 and i-3 once each", len(vs))
	}
}

// TestPostgresStandbyFirst: a DSN that names the standby first still
// reaches the primary, for the store's transactions and its listener;
// the standby, which replays the primary's WAL, holds what they wrote.
func TestPostgresStandbyFirst(t *testing.T) {
	pg := pgtest.NewReplicated(t)
	ctx := context.Background()
	s, err := OpenPostgres(ctx, pg.DSN(pg.Standby, pg.Primary), Options{}) // migrates: writes
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	listening(t, s)
	putHosts(t, s, "h1")
	woken := s.VTPMChanged("i-1")
	other, err := OpenPostgres(ctx, pg.Primary.DSN(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := other.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample("i-1", "p1", "h1")) }); err != nil {
		t.Fatal(err)
	}
	select {
	case <-woken:
	case <-time.After(30 * time.Second):
		t.Fatal("a commit on the primary did not wake the waiter of a store whose DSN names the standby first")
	}
	pg.CatchUp(t)
	standby, err := sql.Open("pgx", pg.Standby.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer standby.Close()
	var n int
	if err := standby.QueryRow(`SELECT count(*) FROM vtpms WHERE instance_id = 'i-1'`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("the standby holds %d vTPMs i-1 (%v), want the one written through the primary", n, err)
	}
}

// listening waits until s's listener first listens.
func listening(t *testing.T, s *Store) {
	t.Helper()
	select {
	case <-s.listened:
	case <-time.After(30 * time.Second):
		t.Fatal("the store's listener did not listen in 30s")
	}
}
