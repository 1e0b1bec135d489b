package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// TestWritersQueue: on SQLite, writers of one Store wait their turn in
// order and all commit (none fails busy, however long the one before
// holds the write); one that waits longer than the store allows fails
// with ErrUnavailable, and the next, once the writer is done, commits.
func TestWritersQueue(t *testing.T) {
	s, _ := engines[0].open(t) // SQLite
	ctx := context.Background()
	putHosts(t, s, "h1")

	holding, release := make(chan struct{}), make(chan struct{})
	held := make(chan error, 1)
	go func() {
		held <- s.Update(ctx, func(tx *Tx) error {
			close(holding)
			<-release
			return tx.CreateVTPM(sample("i-0", "p1", "h1"))
		})
	}()
	<-holding
	const writers = 8
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for i := range writers {
		wg.Go(func() {
			errs <- s.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample(fmt.Sprintf("i-%d", i+1), "p1", "h1")) })
		})
	}
	// Longer than SQLite's busy handler would poll before a writer's
	// first sleeps; the writers wait on the slot, not on the file's lock.
	time.Sleep(300 * time.Millisecond)
	close(release)
	if err := <-held; err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("a queued writer: %v", err)
		}
	}
	var vs []*VTPM
	if err := s.View(ctx, func(tx *Tx) (err error) { vs, err = tx.ListVTPMs(Filter{}); return err }); err != nil {
		t.Fatal(err)
	}
	if len(vs) != writers+1 {
		t.Fatalf("%d vTPMs, want %d: every writer's", len(vs), writers+1)
	}

	s.connWait = 50 * time.Millisecond
	holding, release = make(chan struct{}), make(chan struct{})
	go func() {
		held <- s.Update(ctx, func(tx *Tx) error { close(holding); <-release; return nil })
	}()
	<-holding
	err := s.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample("i-late", "p1", "h1")) })
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, errNoConn) {
		t.Fatalf("a writer that waited past the store's bound: %v, want ErrUnavailable for the writer's slot", err)
	}
	close(release)
	if err := <-held; err != nil {
		t.Fatal(err)
	}
	if err := s.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample("i-late", "p1", "h1")) }); err != nil {
		t.Fatalf("once the writer was done: %v", err)
	}
	// A reader never waits for the writer.
	holding, release = make(chan struct{}), make(chan struct{})
	go func() {
		held <- s.Update(ctx, func(tx *Tx) error { close(holding); <-release; return nil })
	}()
	<-holding
	if err := s.View(ctx, func(tx *Tx) error { _, err := tx.GetVTPM("i-late"); return err }); err != nil {
		t.Fatalf("a reader beside a writer: %v", err)
	}
	close(release)
	if err := <-held; err != nil {
		t.Fatal(err)
	}
}

// TestKeptStatements: on SQLite the store keeps each statement it ran
// prepared, up to maxKept (then it runs new ones as before), and a kept
// statement answers correctly after the schema changed under it and on
// every connection.
func TestKeptStatements(t *testing.T) {
	s, _ := engines[0].open(t) // SQLite
	ctx := context.Background()
	putHosts(t, s, "h1")
	if err := s.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(sample("i-1", "p1", "h1")) }); err != nil {
		t.Fatal(err)
	}
	kept := func() int { s.keptMu.Lock(); defer s.keptMu.Unlock(); return len(s.kept) }
	before := kept()
	if before == 0 {
		t.Fatal("no statement kept after the migrations and a write")
	}
	for range 3 {
		if err := s.View(ctx, func(tx *Tx) error { _, err := tx.GetVTPM("i-1"); return err }); err != nil {
			t.Fatal(err)
		}
	}
	if n := kept(); n != before+1 {
		t.Fatalf("%d statements kept after one read thrice, want %d", n, before+1)
	}

	// The same statements, from transactions on several connections at
	// once.
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for range cap(errs) {
		wg.Go(func() {
			errs <- s.View(ctx, func(tx *Tx) error {
				v, err := tx.GetVTPM("i-1")
				if err == nil && v.Project != "p1" {
					err = fmt.Errorf("read project %q", v.Project)
				}
				return err
			})
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}

	// A kept statement after the schema changed under it.
	count := `SELECT COUNT(*) FROM hosts WHERE name=?`
	var n int
	if err := s.View(ctx, func(tx *Tx) error { return tx.queryRow(count, "h1").Scan(&n) }); err != nil || n != 1 {
		t.Fatalf("count: %d, %v", n, err)
	}
	if err := s.Update(ctx, func(tx *Tx) error { return tx.script(`CREATE TABLE kept_probe (x INTEGER)`) }); err != nil {
		t.Fatal(err)
	}
	if err := s.View(ctx, func(tx *Tx) error { return tx.queryRow(count, "h1").Scan(&n) }); err != nil || n != 1 {
		t.Fatalf("count after a schema change: %d, %v", n, err)
	}

	// Past the bound, new statements still run, and are not kept.
	for i := kept(); i < maxKept+10; i++ {
		var got int
		if err := s.View(ctx, func(tx *Tx) error { return tx.queryRow(fmt.Sprintf(`SELECT %d + ?`, i), 1).Scan(&got) }); err != nil || got != i+1 {
			t.Fatalf("statement %d: %d, %v", i, got, err)
		}
	}
	if n := kept(); n != maxKept {
		t.Fatalf("%d statements kept, want at most %d", n, maxKept)
	}
	// A statement with an error reports it, kept or not.
	if err := s.View(ctx, func(tx *Tx) error { return tx.queryRow(`SELECT nothing FROM nowhere`).Scan(&n) }); err == nil {
		t.Fatal("a statement on a missing table ran")
	}
}

// TestCheckpointer: on SQLite no commit copies the WAL into the database
// (SQLite's automatic checkpoint is off); the store's checkpointer does,
// once enough transactions wrote.
func TestCheckpointer(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "vtpmd.db")
	s, err := Open(context.Background(), path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	var auto int
	if err := s.db.QueryRowContext(ctx, `PRAGMA wal_autocheckpoint`).Scan(&auto); err != nil || auto != 0 {
		t.Fatalf("wal_autocheckpoint = %d, %v; want 0", auto, err)
	}
	// What the database file holds, without the WAL.
	file, err := sql.Open("sqlite", "file:"+path+"?immutable=1")
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	file.SetMaxIdleConns(0) // immutable: a connection would keep the pages it read
	inFile := func() (n int) {
		// An error: not even the tables are there yet.
		file.QueryRowContext(ctx, `SELECT COUNT(*) FROM hosts`).Scan(&n)
		return n
	}
	for i := range checkpointWrites {
		if err := s.Update(ctx, func(tx *Tx) error {
			return tx.PutHost(&Host{Name: fmt.Sprintf("h%d", i), Traits: []string{}, Capacity: 1, Backend: "swtpm"})
		}); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(time.Minute); inFile() != checkpointWrites; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the database file holds %d hosts of %d written a minute ago: no checkpoint", inFile(), checkpointWrites)
		}
	}
}
