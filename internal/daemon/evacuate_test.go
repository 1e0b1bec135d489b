package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/cli"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// killHost ends a's host for good: its agent and its swtpm processes.
func killHost(a *clusterAgent) {
	stop(a.cmd, syscall.SIGKILL)
	for _, p := range swtpmtest.Processes(a.dir) {
		if pid, err := strconv.Atoi(strings.SplitN(p, ":", 2)[0]); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// plantMigration records m in st as a cold migration records it when it
// reaches m.Step (Service.Migrate): the vTPM asked to stop, and from the
// step cleaning on (its record switched to the target) wanted running
// again if it was.
func plantMigration(t *testing.T, st *store.Store, m store.Migration) {
	t.Helper()
	err := st.Update(context.Background(), func(tx *store.Tx) error {
		v, err := tx.GetVTPM(m.InstanceID)
		if err != nil {
			return err
		}
		m.Incarnation, m.Actor = v.Incarnation, "test"
		if err := tx.StartMigration(&m); err != nil {
			return err
		}
		v.Desired = store.DesiredStopped
		if m.Step == store.MigrationCleaning && m.WasRunning {
			v.Desired = store.DesiredRunning
		}
		return tx.UpdateVTPM(v)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// saveState copies the state directory of the vTPM id on the host whose
// agent's data dir is dir; the function it returns puts that copy back.
func saveState(t *testing.T, dir, id string) func() {
	t.Helper()
	var src string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() && d.Name() == id {
			src = p
		}
		return nil
	})
	if src == "" {
		t.Fatalf("no state of %s under %s", id, dir)
	}
	saved := filepath.Join(t.TempDir(), id)
	copyFiles(t, src, saved)
	return func() {
		t.Helper()
		os.RemoveAll(src)
		copyFiles(t, saved, src)
	}
}

// copyFiles copies the regular files of directory from, with their
// modes, into directory to.
func copyFiles(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		info, err := e.Info()
		if err != nil || !info.Mode().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, info.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
	}
}

func endMigration(t *testing.T, st *store.Store, id string) {
	t.Helper()
	if err := st.Update(context.Background(), func(tx *store.Tx) error { return tx.FinishMigration(id) }); err != nil {
		t.Fatal(err)
	}
}

// TestMovesRefused: shelve and unshelve refuse a vTPM that is
// migrating (migration_in_progress) or has a resize awaiting confirm or
// revert (resize_pending), and change nothing of it; evacuate refuses one
// with a resize pending and moves the others.
func TestMovesRefused(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	c := newCluster(t)
	ctx := context.Background()
	a := c.addAgent("hv-a", 4)
	st, err := store.OpenPostgres(ctx, c.dsn, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	id, resized := clusterID(90), clusterID(91)
	for _, x := range []string{id, resized} {
		if _, err := c.create(x); err != nil {
			t.Fatal(err)
		}
		c.wait(x, "active")
		if _, err := c.op.CreateBackup(ctx, x); err != nil {
			t.Fatal(err)
		}
		if _, err := c.op.Stop(ctx, x); err != nil {
			t.Fatal(err)
		}
		c.wait(x, "stopped")
	}
	c.addAgent("hv-b", 4)
	unchanged := func(x, phase, host string) {
		t.Helper()
		v, err := c.op.Get(ctx, x)
		if err != nil || v.Phase != phase || v.Host != host {
			t.Fatalf("%s after a refusal: %s on %q (%v); want %s on %q", x, v.Phase, v.Host, err, phase, host)
		}
	}

	// Migrating: stopped on hv-a, its bundle being exported for hv-b.
	plantMigration(t, st, store.Migration{InstanceID: id, Source: "hv-a", Target: "hv-b", Step: store.MigrationExporting})
	_, err = c.op.Shelve(ctx, id)
	wantCode(t, err, api.CodeMigrationInProgress)
	unchanged(id, "stopped", "hv-a")
	endMigration(t, st, id)

	// A resize awaiting confirm or revert.
	if _, err := c.op.Resize(ctx, resized, api.ResizeRequest{ResolveRequest: api.ResolveRequest{
		FlavorSpecs: map[string]string{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host"}}}); err != nil {
		t.Fatal(err)
	}
	_, err = c.op.Shelve(ctx, resized)
	wantCode(t, err, api.CodeResizePending)
	unchanged(resized, "stopped", "hv-a")

	// Shelved, then (as no API begins either on a shelved vTPM) a
	// migration and a resize recorded on it anyway: unshelve refuses.
	if _, err := c.op.Shelve(ctx, id); err != nil {
		t.Fatal(err)
	}
	plantMigration(t, st, store.Migration{InstanceID: id, Source: "hv-a", Target: "hv-b", Step: store.MigrationStopping})
	_, err = c.op.Unshelve(ctx, id, "")
	wantCode(t, err, api.CodeMigrationInProgress)
	unchanged(id, "shelved", "")
	endMigration(t, st, id)
	err = st.Update(ctx, func(tx *store.Tx) error {
		v, err := tx.GetVTPM(id)
		if err != nil {
			return err
		}
		from := v.Spec
		v.Resize = &store.Resize{Status: store.ResizeResized, Kind: spec.ResizeKeep, From: &from, To: &v.Spec}
		return tx.UpdateVTPM(v)
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.op.Unshelve(ctx, id, "")
	wantCode(t, err, api.CodeResizePending)
	unchanged(id, "shelved", "")

	// Evacuated with the resize pending: refused, where it was; the
	// shelved one is no longer hv-a's.
	killHost(a)
	e, err := c.op.Evacuate(ctx, "hv-a", api.EvacuateRequest{Force: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(e.Items) != 1 || e.Items[0].InstanceID != resized || e.Items[0].Outcome != api.EvacuatedRefused || e.Items[0].Code != api.CodeResizePending {
		t.Fatalf("evacuation: %+v", e)
	}
	unchanged(resized, "stopped", "hv-a")
}

// TestEvacuateMigrating evacuates a host that died while vTPMs
// were migrating from and to it, each from the step its migration
// recorded (vtpms.Service.Evacuate):
//
//   - from it, still stopping: restored from its backup elsewhere, its
//     NV data as of the backup, running again as it was;
//   - from it, its bundle exported (the target's agent was down): the
//     target takes it in, with the NV data written after the backup;
//   - to it, importing: it stays on its source, running again there;
//   - to it, switched to it already (its source's copy not yet removed)
//     and no backup since: back on its source with that copy;
//   - the same with a backup taken on it since: the source's copy goes,
//     and it is restored from that backup elsewhere.
//
// Each has the EKs it had, and evacuating again has nothing left to do.
// vtpmctl prints each outcome as it is known, n of N.
func TestEvacuateMigrating(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	// hv-b's agent is killed below and must read up meanwhile.
	c := newClusterWindow(t, 2*time.Minute)
	ctx := context.Background()
	st, err := store.OpenPostgres(ctx, c.dsn, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	a := c.addAgent("hv-a", 4)
	stopping, exported := clusterID(100), clusterID(101)
	for _, id := range []string{stopping, exported} {
		if _, err := c.create(id); err != nil {
			t.Fatal(err)
		}
	}
	cHost := c.addAgent("hv-c", 6)
	arriving, switched, backedUp := clusterID(102), clusterID(103), clusterID(104)
	for _, id := range []string{arriving, switched, backedUp} {
		if _, err := c.create(id); err != nil {
			t.Fatal(err)
		}
	}
	old, fresh := bytes.Repeat([]byte("O"), 32), bytes.Repeat([]byte("N"), 32)
	idents := map[string]api.Identity{}
	for _, id := range []string{stopping, exported, arriving, switched, backedUp} {
		v := c.wait(id, "active")
		writeNV(t, v.Sockets.Data, old, true)
		if id == stopping || id == exported {
			if _, err := c.op.CreateBackup(ctx, id); err != nil {
				t.Fatal(err)
			}
			writeNV(t, v.Sockets.Data, fresh, false)
		}
		if idents[id], err = c.op.Identity(ctx, id); err != nil {
			t.Fatal(err)
		}
		if _, err := c.op.Stop(ctx, id); err != nil {
			t.Fatal(err)
		}
		c.wait(id, "stopped")
		if _, err := c.op.Start(ctx, id); err != nil { // they were running when their moves began
			t.Fatal(err)
		}
	}
	b := c.addAgent("hv-b", 4)

	// exported: from hv-a to hv-b, whose agent is gone: the bundle is
	// exported, and the import waits.
	stop(b.cmd, syscall.SIGKILL)
	short, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { _, err := c.op.Migrate(short, exported, api.MigrateRequest{Host: "hv-b"}); done <- err }()
	c.eventually("the migration reaches importing", func() error {
		if s := migrationStep(t, st, exported); s != store.MigrationImporting {
			return fmt.Errorf("at step %q", s)
		}
		return nil
	})
	cancel()
	<-done
	c.startAgent(b)

	// switched, backedUp: moved from hv-c to hv-a, their records
	// switched, hv-c's copies still there (as the step cleaning records
	// it): the copies hv-c's agent removed once the moves finished are put
	// back. backedUp ran on hv-a, and was backed up there.
	for _, id := range []string{switched, backedUp} {
		if _, err := c.op.Stop(ctx, id); err != nil {
			t.Fatal(err)
		}
		c.wait(id, "stopped")
		kept := saveState(t, cHost.dir, id)
		if _, err := c.op.Migrate(ctx, id, api.MigrateRequest{Host: "hv-a"}); err != nil {
			t.Fatal(err)
		}
		c.wait(id, "stopped")
		kept()
		gen := int64(1)
		if id == backedUp {
			if _, err := c.op.Start(ctx, id); err != nil {
				t.Fatal(err)
			}
			writeNV(t, c.wait(id, "active").Sockets.Data, fresh, false)
			b, err := c.op.CreateBackup(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			gen = b.Generation - 1 // the migration's export came before
			if _, err := c.op.Stop(ctx, id); err != nil {
				t.Fatal(err)
			}
			c.wait(id, "stopped")
		}
		plantMigration(t, st, store.Migration{InstanceID: id, Source: "hv-c", Target: "hv-a", Step: store.MigrationCleaning, WasRunning: true, Generation: gen})
	}

	// stopping, arriving: recorded at their first steps.
	c.wait(stopping, "active")
	c.wait(arriving, "active")
	plantMigration(t, st, store.Migration{InstanceID: stopping, Source: "hv-a", Target: "hv-b", Step: store.MigrationStopping, WasRunning: true})
	if _, err := c.op.Stop(ctx, arriving); err != nil {
		t.Fatal(err)
	}
	c.wait(arriving, "stopped")
	plantMigration(t, st, store.Migration{InstanceID: arriving, Source: "hv-c", Target: "hv-a", Step: store.MigrationImporting, WasRunning: true})

	killHost(a)
	var out, errOut bytes.Buffer
	if code := cli.Main(ctx, []string{"--server", "unix://" + filepath.Join(c.dir, "api.sock"), "host", "evacuate", "hv-a", "--force"}, &out, &errOut); code != 0 {
		t.Fatalf("vtpmctl host evacuate: %d\n%s%s", code, out.String(), errOut.String())
	}
	t.Logf("vtpmctl host evacuate hv-a --force:\n%s", out.String())
	for _, want := range []string{"evacuating host hv-a: 5 vTPMs", "[5/5] ", stopping + ": restored on hv-", exported + ": its migration finished; on hv-b",
		arriving + ": its migration to this host undone; on hv-c", switched + ": its migration to this host undone; on hv-c", backedUp + ": restored on hv-",
		"host hv-a: 2 restored, 0 new TPM, 0 placed, 0 deleted, 0 shelved, 1 migrated, 2 returned, 0 refused"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("no %q in the output", want)
		}
	}
	for id, want := range map[string][]byte{stopping: old, exported: fresh, arriving: old, switched: old, backedUp: fresh} {
		v := c.wait(id, "active")
		if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, want) {
			t.Fatalf("%s on %s: NV %q, want %q", id, v.Host, got, want)
		}
		after, err := c.op.Identity(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		sameEKs(t, idents[id], after)
		if s := migrationStep(t, st, id); s != "" {
			t.Fatalf("%s: its migration is still at %s", id, s)
		}
	}
	if v, _ := c.op.Get(ctx, exported); v.Host != "hv-b" {
		t.Fatalf("%s on %s, want hv-b", exported, v.Host)
	}
	for _, id := range []string{arriving, switched} {
		if v, _ := c.op.Get(ctx, id); v.Host != "hv-c" {
			t.Fatalf("%s on %s, want hv-c", id, v.Host)
		}
	}
	if !eventWith(t, c, stopping, "migration abandoned", "hv-a is gone") || !eventWith(t, c, exported, "migrated", "gone with that host") ||
		!eventWith(t, c, arriving, "migration undone", "stays on host hv-c") || !eventWith(t, c, switched, "migration undone", "is lost") ||
		!eventWith(t, c, backedUp, "migrated", "the copy on host hv-c is removed") {
		t.Fatal("an event is missing")
	}
	// Again, as JSON: nothing left to do; the progress on stderr.
	out.Reset()
	errOut.Reset()
	if code := cli.Main(ctx, []string{"--server", "unix://" + filepath.Join(c.dir, "api.sock"), "-o", "json", "host", "evacuate", "hv-a", "--force"}, &out, &errOut); code != 0 {
		t.Fatalf("vtpmctl -o json host evacuate: %d\n%s%s", code, out.String(), errOut.String())
	}
	var again api.Evacuation
	if err := json.Unmarshal(out.Bytes(), &again); err != nil || again.Host != "hv-a" || len(again.Items) != 0 {
		t.Fatalf("evacuating again, as JSON: %+v, %v\n%s", again, err, out.String())
	}
	if !strings.Contains(errOut.String(), "evacuating host hv-a: 0 vTPMs") {
		t.Fatalf("progress on stderr: %q", errOut.String())
	}
}
