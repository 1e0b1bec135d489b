// Package storetest opens the store the tests of packages above the store
// run on: SQLite in a temporary directory, or with VTPMD_TEST_STORE=postgres
// (make test runs the store's users both ways) a fresh database on a
// throwaway PostgreSQL (internal/store/pgtest). A package that uses it
// calls Main from its TestMain, which stops that PostgreSQL.
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
	var open func() (*store.Store, error)
	switch os.Getenv("VTPMD_TEST_STORE") {
	case "", "sqlite":
		open = func() (*store.Store, error) {
			return store.Open(context.Background(), filepath.Join(dir, "db"), opts)
		}
	case "postgres":
		dsn := pgtest.DSN(t)
		open = func() (*store.Store, error) { return store.OpenPostgres(context.Background(), dsn, opts) }
	default:
		t.Fatalf("VTPMD_TEST_STORE=%q: want sqlite or postgres", os.Getenv("VTPMD_TEST_STORE"))
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
