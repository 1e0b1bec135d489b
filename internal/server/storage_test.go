package server

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/store"
)

// TestFullDisk: with SQLite's disk full (a real tmpfs, filled), where the
// key manager keeps its secrets too, a create answers 507 storage_full,
// not 500, and leaves neither a record nor a secret; once the disk is
// freed the same create succeeds.
func TestFullDisk(t *testing.T) {
	for _, full := range []string{"store"} {
		t.Run(full, func(t *testing.T) {
			disk := citest.SmallDisk(t, 1<<20)
			ctx := context.Background()
			st, err := store.Open(ctx, filepath.Join(disk, "db"), store.Options{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { st.Close() })
			kr, err := embedded.Open(ctx, st, filepath.Join(t.TempDir(), "master.key"))
			if err != nil {
				t.Fatal(err)
			}
			f := serveFixture(t, st, kr, disk, setup{})

			free := citest.Fill(t, disk)
			var e api.ErrorBody
			if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), &e); code != 507 || e.Error.Code != api.CodeStorageFull {
				t.Fatalf("create on a full disk: %d %+v; want 507 %s", code, e, api.CodeStorageFull)
			}
			var vs []*store.VTPM
			if err := st.View(ctx, func(tx *store.Tx) (err error) { vs, err = tx.ListVTPMs(store.Filter{}); return err }); err != nil || len(vs) != 0 {
				t.Fatalf("records after the failed create: %d, %v", len(vs), err)
			}
			if ids, err := kr.List(ctx); err != nil || len(ids) != 0 {
				t.Fatalf("secrets after the failed create: %v, %v", ids, err)
			}
			free()
			if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil); code != 202 {
				t.Fatalf("create after the disk was freed: %d", code)
			}
		})
	}
}
