package store

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

// TestPostgresOutage stops PostgreSQL under two stores: every transaction
// fails with ErrUnavailable and writes nothing; once it is back, the next
// ones succeed, and each store's listener is back too: it wakes every
// waiter once (notifications were missed), and other stores' commits wake
// them again.
func TestPostgresOutage(t *testing.T) {
	a, reopen := engines[1].open(t) // PostgreSQL
	b, err := reopen()
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	<-b.listened
	ctx := context.Background()
	putHosts(t, a, "h1")
	if err := a.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample("i-1", "p1", "h1")) }); err != nil {
		t.Fatal(err)
	}
	survivesOutage(t, a, b, "PostgreSQL is down", func() {}, pgtest.Halt, pgtest.Resume)
}

// survivesOutage runs a and b, two stores on one database holding vTPM
// i-1, through an outage (down, then up, after ready): meanwhile every
// transaction fails with ErrUnavailable, not committing; after it the
// next ones succeed, each listener is back and wakes every waiter once
// (notifications were missed), and one store's commits wake the other's
// waiters; i-1 and what was made after are there, once each.
func survivesOutage(t *testing.T, a, b *Store, during string, ready func(), down, up func(testing.TB)) {
	t.Helper()
	ctx := context.Background()
	ready()
	missed := b.VTPMChanged("i-7") // no commit changes i-7: only the reconnect wakes it

	down(t)
	create := func(tx *Tx) error { return tx.CreateVTPM(sample("i-2", "p1", "h1")) }
	for name, err := range map[string]error{
		"Update": a.Update(ctx, create),
		"View":   b.View(ctx, func(tx *Tx) error { _, err := tx.GetVTPM("i-1"); return err }),
	} {
		var ue *UnavailableError
		if !errors.Is(err, ErrUnavailable) || !errors.As(err, &ue) || ue.MaybeCommitted() {
			t.Fatalf("%s while %s: %v, want ErrUnavailable, not committing", name, during, err)
		}
	}
	up(t)

	if err := a.Update(ctx, create); err != nil {
		t.Fatalf("the first transaction after the outage: %v", err)
	}
	select {
	case <-missed:
	case <-time.After(30 * time.Second):
		t.Fatal("the listener did not come back, or woke no one when it did")
	}
	woken := b.VTPMChanged("i-3")
	if err := a.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample("i-3", "p1", "h1")) }); err != nil {
		t.Fatal(err)
	}
	select {
	case <-woken:
	case <-time.After(30 * time.Second):
		t.Fatal("after the outage, another store's commit did not wake a waiter")
	}
	var vs []*VTPM
	if err := b.View(ctx, func(tx *Tx) (err error) { vs, err = tx.ListVTPMs(Filter{}); return err }); err != nil {
		t.Fatal(err)
	}
	if len(vs) != 3 || vs[0].InstanceID != "i-1" || vs[1].InstanceID != "i-2" || vs[2].InstanceID != "i-3" {
		t.Fatalf("after the outage the store holds %d vTPMs, want i-1 (from before it), i-2 and i-3 once each", len(vs))
	}
}

// TestPoolExhausted: a transaction that finds no connection free in time
// fails with ErrUnavailable, and the next one, with connections free
// again, succeeds.
func TestPoolExhausted(t *testing.T) {
	s, _ := engines[1].open(t) // PostgreSQL
	ctx := context.Background()
	putHosts(t, s, "h1")
	s.connWait = 50 * time.Millisecond
	var held []interface{ Close() error }
	for range postgresConns {
		c, err := s.db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	err := s.View(ctx, func(tx *Tx) error { _, err := tx.GetHost("h1"); return err })
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, errNoConn) {
		t.Fatalf("a transaction with every connection busy: %v, want ErrUnavailable", err)
	}
	for _, c := range held {
		c.Close()
	}
	if err := s.View(ctx, func(tx *Tx) error { _, err := tx.GetHost("h1"); return err }); err != nil {
		t.Fatalf("with connections free again: %v", err)
	}
}

// What PostgreSQL answers when it cannot serve: each is unreachable (the
// API's 503 store_unavailable), and a refused statement is not.
func TestUnreachableCodes(t *testing.T) {
	for code, want := range map[string]bool{
		"08006": true,  // connection failure
		"57P01": true,  // admin shutdown
		"57P03": true,  // cannot connect now (starting)
		"53300": true,  // too many connections
		"25006": true,  // read-only transaction: a standby, reached without target_session_attrs
		"23505": false, // unique violation
		"42P01": false, // undefined table
	} {
		if got := unreachable(fmt.Errorf("wrapped: %w", &pgconn.PgError{Code: code})); got != want {
			t.Errorf("SQLSTATE %s unreachable = %v, want %v", code, got, want)
		}
	}
}
