// Package pgtest runs a throwaway PostgreSQL server for tests, from
// Debian's packages: one per test process, reached over a unix socket
// only, with a fresh database per test. As root it runs the server as the
// postgres user (initdb refuses root). Halt and Resume stop and start it
// again, its databases kept, for tests of an outage. NewReplicated makes a
// primary and its standby apart from it, for one test of a failover.
package pgtest

import (
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" driver

	"github.com/vtpmd/vtpmd/internal/citest"
)

var (
	once     sync.Once
	dir      string // socket and data directory
	port     int
	startErr error
	stop     func()
	next     atomic.Int64
	// pgCtl runs pg_ctl with args, as the server's user.
	pgCtl  func(args ...string) error
	halted bool // by Halt, until Resume
)

// DSN returns the connection string of a fresh, empty database, dropped
// when the test ends. Without PostgreSQL installed the test is skipped,
// and fails under CI=true.
func DSN(t testing.TB) string {
	t.Helper()
	once.Do(start)
	if startErr != nil {
		citest.Missing(t, "PostgreSQL: %v", startErr)
	}
	name := fmt.Sprintf("test_%d_%d", os.Getpid(), next.Add(1))
	admin, err := sql.Open("pgx", dsn("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if admin, err := sql.Open("pgx", dsn("postgres")); err == nil {
			admin.Exec("DROP DATABASE " + name + " WITH (FORCE)")
			admin.Close()
		}
	})
	return dsn(name)
}

func dsn(db string) string {
	return fmt.Sprintf("host=%s port=%d user=postgres dbname=%s sslmode=disable", dir, port, db)
}

// Stop stops the server, if one was started; call it from TestMain.
func Stop() {
	if stop != nil {
		stop()
	}
}

func start() {
	var bin string
	if bin, startErr = binaries(); startErr != nil {
		return
	}
	if dir, startErr = tempDir(); startErr != nil {
		return
	}
	port = 20000 + os.Getpid()%10000 // names the socket file only: no TCP
	data := filepath.Join(dir, "data")
	if startErr = run(bin, "initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"); startErr != nil {
		return
	}
	pgCtl = func(args ...string) error { return run(bin, "pg_ctl", append([]string{"-D", data}, args...)...) }
	if startErr = up(); startErr != nil {
		return
	}
	stop = func() {
		pgCtl("-m", "immediate", "-w", "stop")
		os.RemoveAll(dir)
	}
}

// binaries finds the directory of the newest PostgreSQL installed.
func binaries() (string, error) {
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_ctl")
	if len(bins) == 0 {
		return "", fmt.Errorf("not installed (Debian package postgresql)")
	}
	slices.Sort(bins)
	return filepath.Dir(bins[len(bins)-1]), nil
}

// tempDir makes a directory for data and sockets, the postgres user's
// when run as root. Its name carries this process's pid, so that a later
// test process reaps the servers of one that died without stopping them
// (a test binary killed at its timeout).
func tempDir() (string, error) {
	reapOrphans()
	d, err := os.MkdirTemp("", fmt.Sprintf("vtpmd-pg-%d-", os.Getpid()))
	if err != nil || os.Geteuid() != 0 {
		return d, err
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return d, err
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return d, os.Chown(d, uid, gid)
}

// run runs PostgreSQL's program name from bin, as the postgres user when
// run as root (initdb refuses root).
func run(bin, name string, args ...string) error {
	cmd := exec.Command(filepath.Join(bin, name), args...)
	if os.Geteuid() == 0 {
		cmd = exec.Command("runuser", append([]string{"-u", "postgres", "--", filepath.Join(bin, name)}, args...)...)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v\n%s", name, err, out)
	}
	return nil
}

// up starts the server on its data directory and waits until it takes
// connections.
func up() error {
	opts := fmt.Sprintf("-c listen_addresses='' -k %s -p %d -c fsync=off -c max_connections=200", dir, port)
	return pgCtl("-o", opts, "-l", filepath.Join(dir, "log"), "-w", "start")
}

// Halt stops the server as an outage would: a fast shutdown, which ends
// every connection (clients read "terminating connection due to
// administrator command") and refuses new ones, the databases kept,
// until Resume (or the test's end). No other test of its process may use
// PostgreSQL meanwhile: none runs in parallel with it.
func Halt(t testing.TB) {
	t.Helper()
	once.Do(start)
	if startErr != nil {
		citest.Missing(t, "PostgreSQL: %v", startErr)
	}
	if err := pgCtl("-m", "fast", "-w", "stop"); err != nil {
		t.Fatal(err)
	}
	halted = true
	t.Cleanup(func() {
		if halted {
			Resume(t)
		}
	})
}

// Resume starts the server Halt stopped and waits until it takes
// connections.
func Resume(t testing.TB) {
	t.Helper()
	if err := up(); err != nil {
		t.Fatal(err)
	}
	halted = false
}

// reapOrphans stops the servers of test processes that are gone, by the
// pid files in their data directories, and removes their directories. A
// server's immediate shutdown (SIGQUIT) is all a throwaway one needs.
func reapOrphans() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "vtpmd-pg-*-*"))
	for _, d := range dirs {
		owner, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(d), "vtpmd-pg-"), "-")
		pid, err := strconv.Atoi(owner)
		if err != nil || pid <= 0 || syscall.Kill(pid, 0) != syscall.ESRCH {
			continue // not ours, or its process lives
		}
		pidFiles, _ := filepath.Glob(filepath.Join(d, "*", "postmaster.pid"))
		for _, f := range pidFiles {
			b, _ := os.ReadFile(f)
			first, _, _ := strings.Cut(string(b), "\n")
			if server, err := strconv.Atoi(strings.TrimSpace(first)); err == nil && server > 0 {
				syscall.Kill(server, syscall.SIGQUIT)
			}
		}
		os.RemoveAll(d)
	}
}
