package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

// TestFullDisk: when the database's disk is full, Update fails with an
// error that wraps ErrFull, whatever the engine says (SQLite: SQLITE_FULL;
// PostgreSQL: 53100 disk_full, here with the tables in a tablespace on the
// full disk), nothing is written, and the same Update succeeds once the
// disk is freed.
func TestFullDisk(t *testing.T) {
	open := map[string]func(t *testing.T, disk string) *Store{
		"sqlite": func(t *testing.T, disk string) *Store {
			s, err := Open(context.Background(), filepath.Join(disk, "vtpmd.db"), Options{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s
		},
		"postgres": func(t *testing.T, disk string) *Store {
			dsn := pgtest.DSN(t)
			u, err := user.Lookup("postgres")
			if err != nil {
				t.Fatal(err)
			}
			uid, _ := strconv.Atoi(u.Uid)
			gid, _ := strconv.Atoi(u.Gid)
			if err := os.Chown(disk, uid, gid); err != nil {
				t.Fatal(err)
			}
			admin, err := sql.Open("pgx", dsn)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { admin.Close() })
			space := fmt.Sprintf("full_%d", os.Getpid())
			if _, err := admin.Exec("CREATE TABLESPACE " + space + " LOCATION '" + disk + "'"); err != nil {
				t.Fatal(err)
			}
			s, err := OpenPostgres(context.Background(), dsn+" default_tablespace="+space, Options{})
			if err != nil {
				t.Fatal(err)
			}
			// Before the database is dropped and the disk unmounted: the
			// tablespace must be empty to go.
			t.Cleanup(func() {
				s.Close()
				admin.Exec("DROP SCHEMA public CASCADE")
				if _, err := admin.Exec("DROP TABLESPACE " + space); err != nil {
					t.Errorf("dropping the tablespace: %v", err)
				}
			})
			return s
		},
	}
	for _, engine := range []string{"sqlite", "postgres"} {
		t.Run(engine, func(t *testing.T) {
			disk := citest.SmallDisk(t, 4<<20)
			s := open[engine](t, disk)
			ctx := context.Background()
			put := func() error {
				return s.Update(ctx, func(tx *Tx) error { return tx.PutHost(&Host{Name: "h1", Capacity: 1, Backend: "swtpm"}) })
			}
			free := citest.Fill(t, disk)
			if err := put(); !errors.Is(err, ErrFull) {
				t.Fatalf("an Update on a full disk: %v; want ErrFull", err)
			}
			free()
			if err := s.View(ctx, func(tx *Tx) error { _, err := tx.GetHost("h1"); return err }); !errors.Is(err, ErrNotFound) {
				t.Fatalf("the failed Update wrote: %v", err)
			}
			if err := put(); err != nil {
				t.Fatalf("the same Update after the disk was freed: %v", err)
			}
		})
	}
}
