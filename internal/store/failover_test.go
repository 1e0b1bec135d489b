package store

import (
	"context"
	"database/sql"
	"slices"
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
	survivesOutage(t, a, b, "the primary is down and the standby not promoted", func() { pg.CatchUp(t) },
		func(t testing.TB) { pg.Primary.Stop(t) }, func(t testing.TB) { pg.Promote(t) })
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

// TestWatchAfterLossyFailover: a watcher that read a host's changes on
// the old primary, including writes the standby never received, is told
// to start over by the promoted standby, even once the host's revision
// there has climbed past the one it holds with other writes. Without the
// timeline in its token it would skip those writes as already seen.
func TestWatchAfterLossyFailover(t *testing.T) {
	pg := pgtest.NewReplicated(t)
	ctx := context.Background()
	s, err := OpenPostgres(ctx, pg.DSN(pg.Primary, pg.Standby), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	putHosts(t, s, "h1")
	create := func(id string) {
		t.Helper()
		if err := s.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample(id, "p1", "h1")) }); err != nil {
			t.Fatal(err)
		}
	}
	watch := func(since int64) *Changes {
		t.Helper()
		var c *Changes
		if err := s.View(ctx, func(tx *Tx) error { c, err = tx.WatchVTPMs("h1", since); return err }); err != nil {
			t.Fatal(err)
		}
		return c
	}
	create("i-kept")
	pg.CatchUp(t)
	pg.Standby.Stop(t)
	create("i-lost-1")
	create("i-lost-2")
	held := watch(0).Token // the old primary's: the lost writes seen
	pg.Primary.Stop(t)
	pg.Standby.Start(t)
	pg.Promote(t)
	for _, id := range []string{"i-new-1", "i-new-2", "i-new-3"} {
		create(id) // the host's revision passes the held one's
	}
	c := watch(held)
	if !c.Reset {
		t.Fatalf("a token of the old timeline was answered with %d changes, not told to start over", len(c.VTPMs))
	}
	var ids []string
	for _, v := range c.VTPMs {
		ids = append(ids, v.InstanceID)
	}
	if want := []string{"i-kept", "i-new-1", "i-new-2", "i-new-3"}; !slices.Equal(ids, want) {
		t.Fatalf("after the failover the watcher reads %v, want %v", ids, want)
	}
	if next := watch(c.Token); next.Reset || len(next.VTPMs) != 0 {
		t.Fatalf("the new timeline's token: reset %v, %d changes; want none", next.Reset, len(next.VTPMs))
	}
}
