package daemon

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	pgtest.Stop()
	os.Exit(code)
}

// openKeyring opens the key manager of the server whose data dir is dir
// (SQLite store, default master key file), as a second process would.
func openKeyring(t testing.TB, dir string) *embedded.Keyring {
	t.Helper()
	st, err := store.Open(context.Background(), filepath.Join(dir, "vtpmd.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	kr, err := embedded.Open(context.Background(), st, filepath.Join(dir, "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	return kr
}
