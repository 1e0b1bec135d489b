package pgtest

import (
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/citest"
)

// Replicated is a PostgreSQL primary and its hot standby, streaming
// replication between them (asynchronous), made for one test and apart
// from the server DSN's: a test may crash the primary (Stop) and promote
// the standby, as a failover does. Both serve one database, "vtpmd", over
// unix sockets in one directory, each on a port of its own.
type Replicated struct {
	Primary, Standby *Node
}

// Node is one server of a Replicated pair.
type Node struct {
	name string
	dir  string // its socket's directory
	port int
	// pgCtl runs pg_ctl with args on its data directory.
	pgCtl func(args ...string) error
}

// The pair's database.
const replicatedDB = "vtpmd"

// NewReplicated starts a primary with database "vtpmd", copies it with
// pg_basebackup -R (over the primary's unix socket, which initdb's
// pg_hba.conf lets any local user replicate from under -A trust) and
// starts the copy as its hot standby. Both are stopped, and their files
// removed, when the test ends. Without PostgreSQL installed the test is
// skipped, and fails under CI=true.
func NewReplicated(t testing.TB) *Replicated {
	t.Helper()
	bin, err := binaries()
	if err != nil {
		citest.Missing(t, "PostgreSQL: %v", err)
	}
	dir, err := tempDir()
	if err != nil {
		t.Fatal(err)
	}
	r := &Replicated{Primary: newNode(bin, dir, "primary", 5432), Standby: newNode(bin, dir, "standby", 5433)}
	t.Cleanup(func() {
		r.Primary.pgCtl("-m", "immediate", "-w", "stop")
		r.Standby.pgCtl("-m", "immediate", "-w", "stop")
		os.RemoveAll(dir)
	})
	if err := run(bin, "initdb", "-D", filepath.Join(dir, "primary"), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"); err != nil {
		t.Fatal(err)
	}
	if err := r.Primary.start(); err != nil {
		t.Fatal(err)
	}
	if err := r.Primary.exec("postgres", "CREATE DATABASE "+replicatedDB); err != nil {
		t.Fatal(err)
	}
	// -R writes standby.signal and primary_conninfo (this socket and port).
	err = run(bin, "pg_basebackup", "-D", filepath.Join(dir, "standby"), "-R", "-X", "stream", "-c", "fast", "--no-sync",
		"-h", dir, "-p", fmt.Sprint(r.Primary.port), "-U", "postgres")
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Standby.start(); err != nil {
		t.Fatal(err)
	}
	return r
}

func newNode(bin, dir, name string, port int) *Node {
	data := filepath.Join(dir, name)
	return &Node{name: name, dir: dir, port: port,
		pgCtl: func(args ...string) error { return run(bin, "pg_ctl", append([]string{"-D", data}, args...)...) }}
}

// start starts n and waits until it takes connections (a hot standby's
// read-only ones).
func (n *Node) start() error {
	opts := fmt.Sprintf("-c listen_addresses='' -k %s -p %d -c fsync=off", n.dir, n.port)
	return n.pgCtl("-o", opts, "-l", filepath.Join(n.dir, n.name+".log"), "-w", "start")
}

// DSN is the connection string of n's database, n alone.
func (n *Node) DSN() string {
	return fmt.Sprintf("host=%s port=%d user=postgres dbname=%s sslmode=disable", n.dir, n.port, replicatedDB)
}

func (n *Node) exec(db, query string) error {
	c, err := sql.Open("pgx", fmt.Sprintf("host=%s port=%d user=postgres dbname=%s sslmode=disable", n.dir, n.port, db))
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Exec(query)
	return err
}

func (n *Node) queryRow(query string, dest any) error {
	c, err := sql.Open("pgx", n.DSN())
	if err != nil {
		return err
	}
	defer c.Close()
	return c.QueryRow(query).Scan(dest)
}

// DSN is the connection string of the pair's database that vtpmd's
// documentation recommends: both servers, first the one named first,
// with target_session_attrs=read-write, so that a connection is made
// only to whichever of them takes writes.
func (r *Replicated) DSN(first, second *Node) string {
	return fmt.Sprintf("host=%s,%s port=%d,%d user=postgres dbname=%s sslmode=disable target_session_attrs=read-write",
		first.dir, second.dir, first.port, second.port, replicatedDB)
}

// CatchUp waits until the standby has replayed all the WAL the primary
// has written so far: whatever committed on the primary before the call
// is on the standby too.
func (r *Replicated) CatchUp(t testing.TB) {
	t.Helper()
	var lsn string
	if err := r.Primary.queryRow("SELECT pg_current_wal_lsn()::text", &lsn); err != nil {
		t.Fatal(err)
	}
	q := fmt.Sprintf("SELECT pg_last_wal_replay_lsn() >= '%s'::pg_lsn", lsn)
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		var done bool
		if err := r.Standby.queryRow(q, &done); err != nil {
			t.Fatal(err)
		}
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the standby has not replayed the primary's WAL up to %s in a minute", lsn)
		}
	}
}

// Stop stops n at once, as a crash would: every connection is cut, and a
// primary sends its standby nothing more.
func (n *Node) Stop(t testing.TB) {
	t.Helper()
	if err := n.pgCtl("-m", "immediate", "-w", "stop"); err != nil {
		t.Fatal(err)
	}
}

// Start starts n again after Stop: a standby resumes replaying what it
// received, and asks its primary for more.
func (n *Node) Start(t testing.TB) {
	t.Helper()
	if err := n.start(); err != nil {
		t.Fatal(err)
	}
}

// Promote makes the standby a primary and waits until it takes writes.
func (r *Replicated) Promote(t testing.TB) {
	t.Helper()
	if err := r.Standby.pgCtl("-w", "promote"); err != nil {
		t.Fatal(err)
	}
	var ro string
	if err := r.Standby.queryRow("SHOW transaction_read_only", &ro); err != nil || !strings.EqualFold(ro, "off") {
		t.Fatalf("the promoted standby: transaction_read_only %q, %v", ro, err)
	}
}
