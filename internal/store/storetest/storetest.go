// Package storetest opens the store the tests of packages above the store
// run on: SQLite in a temporary directory, or with VTPMD_TEST_STORE=postgres
// (make test runs the store's users both ways) a fresh database on a
// throwaway PostgreSQL (internal/store/pgtest). Tests of several servers
// sharing one database run on both, whatever it says (OnEngines). A
// package that uses it calls Main from its TestMain, which stops that
// PostgreSQL.
package storetest

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

// Open opens a fresh, empty store, closed when the test ends.
func Open(t testing.TB) *store.Store { return Opener(t, t.TempDir(), store.Options{})() }

// Opener makes a fresh, empty store (SQLite in dir) and returns a function
// that opens a new handle on it each time it is called, as another
// process would; each is closed when the test ends.
func Opener(t testing.TB, dir string, opts store.Options) func() *store.Store {
	t.Helper()
	engine := os.Getenv("VTPMD_TEST_STORE")
	switch engine {
	case "":
		engine = "sqlite"
	case "sqlite", "postgres":
	default:
		t.Fatalf("VTPMD_TEST_STORE=%q: want sqlite or postgres", engine)
	}
	return opener(t, engine, dir, opts)
}

// OnEngines runs test once on SQLite and once on PostgreSQL, as subtests,
// with a function that opens a new handle on one fresh database each time
// it is called, as another server would: several servers sharing one
// database is what PostgreSQL is for, and SQLite must stay right too.
func OnEngines(t *testing.T, test func(t *testing.T, open func() *store.Store)) {
	for _, engine := range []string{"sqlite", "postgres"} {
		t.Run(engine, func(t *testing.T) { test(t, opener(t, engine, t.TempDir(), store.Options{})) })
	}
}

// OpenEngine opens a fresh, empty store on engine ("sqlite" or
// "postgres"), whatever VTPMD_TEST_STORE says: for benchmarks that
// compare the two in one run.
func OpenEngine(t testing.TB, engine string) *store.Store {
	return opener(t, engine, t.TempDir(), store.Options{})()
}

func opener(t testing.TB, engine, dir string, opts store.Options) func() *store.Store {
	t.Helper()
	open := func() (*store.Store, error) {
		return store.Open(context.Background(), filepath.Join(dir, "db"), opts)
	}
	if engine == "postgres" {
		dsn := pgtest.DSN(t)
		open = func() (*store.Store, error) { return store.OpenPostgres(context.Background(), dsn, opts) }
	}
	return func() *store.Store {
		t.Helper()
		st, err := open()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
}

// Main runs the tests of m and stops the PostgreSQL they used, if any; call
// it from TestMain.
func Main(m *testing.M) int {
	defer pgtest.Stop()
	return m.Run()
}
