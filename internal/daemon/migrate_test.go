package daemon

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cli"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// hasState says whether the host whose agent's data dir is dir holds
// state of the vTPM id: a directory of that name with its swtpm state.
func hasState(t testing.TB, dir, id string) bool {
	t.Helper()
	found := false
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() && d.Name() == id {
			if _, err := os.Stat(filepath.Join(p, "tpm2-00.permall")); err == nil {
				found = true
			}
		}
		return nil
	})
	return found
}

// onlyOn checks that the vTPM id's state is on host and on none of the
// other agents' hosts.
func (c *cluster) onlyOn(id, host string) {
	c.t.Helper()
	for name, a := range c.agents {
		if got := hasState(c.t, a.dir, id); got != (name == host) {
			c.t.Fatalf("host %s holds state of %s: %v; want it on %s alone", name, id, got, host)
		}
	}
}

// TestClusterMigrate moves a running vTPM, cold, between two hosts whose
// agents are their own vtpmd processes: an NV index and an NV counter
// written through its socket with tpm2-tools before read the same on the
// new host, with the same endorsement keys and certificate; it runs again
// there; the old host keeps nothing. Placement chooses the target unless
// one is named, and the refusals have their codes.
func TestClusterMigrate(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	c := newCluster(t)
	ctx := context.Background()
	c.addAgent("hv-a", 2)
	c.addAgent("hv-b", 2)
	id := clusterID(60)
	if _, err := c.create(id); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	if v.Host != "hv-a" {
		t.Fatalf("placed on %s, want hv-a (the most free, then the first name)", v.Host)
	}
	data := bytes.Repeat([]byte("M"), 32)
	writeNV(t, v.Sockets.Data, data, true)
	increment(t, v.Sockets.Data)
	increment(t, v.Sockets.Data)
	counter := readCounter(t, v.Sockets.Data)
	before, err := c.op.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}

	if code, out, errOut := c.vtpmctl("migrate", id, "--to", "hv-a"); code != cli.ExitFailed || !strings.Contains(errOut, string(api.CodeTargetIsSource)) {
		t.Fatalf("vtpmctl migrate --to its own host: exit %d\n%s%s", code, out, errOut)
	}
	_, err = c.op.Migrate(ctx, id, api.MigrateRequest{Host: "hv-z"})
	wantCode(t, err, api.CodeNotFound)
	_, err = c.op.Migrate(ctx, clusterID(61), api.MigrateRequest{})
	wantCode(t, err, api.CodeNotFound)
	if _, err := c.op.DrainHost(ctx, "hv-b"); err != nil {
		t.Fatal(err)
	}
	_, err = c.op.Migrate(ctx, id, api.MigrateRequest{})
	wantCode(t, err, api.CodeNoValidHost)
	_, err = c.op.Migrate(ctx, id, api.MigrateRequest{Host: "hv-b"})
	wantCode(t, err, api.CodeNoValidHost)
	if _, err := c.op.UndrainHost(ctx, "hv-b"); err != nil {
		t.Fatal(err)
	}
	if got := c.wait(id, "active"); got.Host != "hv-a" {
		t.Fatalf("a refused migration moved the vTPM to %s", got.Host)
	}

	code, out, errOut := c.vtpmctl("live-migrate", id, "--to", "hv-b")
	if code != cli.ExitConflict || !strings.Contains(errOut, string(api.CodeNotSupported)) || !strings.Contains(errOut, "vtpmctl migrate") {
		t.Fatalf("vtpmctl live-migrate on swtpm hosts: exit %d\n%s%s", code, out, errOut)
	}

	// Through vtpmctl: its progress, each step's event as it comes, then
	// where the vTPM is.
	code, out, errOut = c.vtpmctl("migrate", id)
	if code != cli.ExitOK {
		t.Fatalf("vtpmctl migrate: exit %d\n%s%s", code, out, errOut)
	}
	t.Logf("vtpmctl migrate %s:\n%s", id, out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var steps []string
	for _, l := range lines[:len(lines)-1] {
		if f := strings.Fields(l); len(f) > 2 && strings.HasPrefix(f[1], "migrat") {
			steps = append(steps, f[1]+" "+f[2])
		}
	}
	if want := []string{"migration started", "migration exported", "migration imported", "migrated from"}; !slices.Equal(steps, want) {
		t.Errorf("vtpmctl migrate's progress: steps %q, want %q\n%s", steps, want, out)
	}
	if last := lines[len(lines)-1]; !strings.HasPrefix(last, "migrated: the vTPM of "+id+" is on host hv-b (") {
		t.Errorf("vtpmctl migrate's last line: %q", last)
	}
	moved, err := c.op.Get(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if moved.Host != "hv-b" || moved.Desired != "running" {
		t.Fatalf("after the migration: host %s, desired %s; want hv-b, running", moved.Host, moved.Desired)
	}
	c.onlyOn(id, "hv-b")
	v = c.wait(id, "active")
	if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, data) {
		t.Fatalf("NV index on the new host = %q, want %q", got, data)
	}
	if got := readCounter(t, v.Sockets.Data); !bytes.Equal(got, counter) {
		t.Fatalf("NV counter on the new host = %x, want %x", got, counter)
	}
	increment(t, v.Sockets.Data) // the TPM works on from there
	after, err := c.op.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if len(after.EKs) == 0 || len(after.EKs) != len(before.EKs) {
		t.Fatalf("EKs %d after, %d before", len(after.EKs), len(before.EKs))
	}
	for i := range before.EKs {
		if after.EKs[i] != before.EKs[i] || before.EKs[i].CertificatePEM == "" {
			t.Fatalf("EK %d: %+v after the move, %+v before (with a certificate)", i, after.EKs[i], before.EKs[i])
		}
	}
	checkIdentity(t, c.op, v) // the running TPM holds the recorded EKs

	evs, err := c.op.Events(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, e := range evs.Items {
		actions = append(actions, e.Action)
	}
	for _, want := range []string{"migration started", "migration exported", "migration imported", "migrated"} {
		if !slices.Contains(actions, want) {
			t.Errorf("no %q event among %q", want, actions)
		}
	}

	// Back, named, while stopped: it stays stopped, and the move begins
	// with the export (no stop to await).
	if _, err := c.op.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "stopped")
	back, err := c.op.Migrate(ctx, id, api.MigrateRequest{Host: "hv-a"})
	if err != nil || back.Host != "hv-a" || back.Desired != "stopped" {
		t.Fatalf("back: %+v, %v", back, err)
	}
	c.onlyOn(id, "hv-a")
	if evs, err = c.op.Events(ctx, id); err != nil {
		t.Fatal(err)
	}
	var started []string
	for _, e := range evs.Items {
		if e.Action == "migration started" {
			started = append(started, e.Detail)
		}
	}
	if want := []string{"from host hv-a to host hv-b; stopped for the move", "from host hv-b to host hv-a; stopped already"}; !slices.Equal(started, want) {
		t.Errorf("migration started events %q, want %q", started, want)
	}
}

// migrationStep reads the step of the vTPM id's migration from st: ""
// when it has none.
func migrationStep(t *testing.T, st *store.Store, id string) store.MigrationStep {
	var m *store.Migration
	err := st.View(context.Background(), func(tx *store.Tx) (err error) { m, err = tx.GetMigration(id); return err })
	if errors.Is(err, store.ErrNotFound) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	return m.Step
}

// TestCrashMidMigrate kills, with SIGKILL, the server, the source host's
// agent or the destination host's agent as a cold migration reaches each
// of its steps. After each kill the vTPM's record names a host that holds
// its state (one usable copy: a copy the destination took in before the
// record switched is never used), and once the killed process is back the
// same migrate finishes the move: the state is on the destination alone,
// and the NV index written before the first move reads the same.
func TestCrashMidMigrate(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	c := newCluster(t)
	c.addAgent("hv-a", 2)
	c.addAgent("hv-b", 2)
	st, err := store.OpenPostgres(context.Background(), c.dsn, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	id := clusterID(62)
	if _, err := c.create(id); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	data := bytes.Repeat([]byte("K"), 32)
	writeNV(t, v.Sockets.Data, data, true)
	if _, err := c.op.Stop(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "stopped")

	hit := map[string]int{}
	steps := []store.MigrationStep{store.MigrationStopping, store.MigrationExporting, store.MigrationImporting, store.MigrationCleaning}
	for _, victim := range []string{"server", "source", "target"} {
		for _, step := range steps {
			// A running vTPM's move begins at stopping, a stopped one's
			// at exporting.
			phase, err := "stopped", error(nil)
			if step == store.MigrationStopping {
				phase = "active"
				_, err = c.op.Start(context.Background(), id)
			} else {
				_, err = c.op.Stop(context.Background(), id)
			}
			if err != nil {
				t.Fatal(err)
			}
			cur := c.wait(id, phase)
			source, target := cur.Host, map[string]string{"hv-a": "hv-b", "hv-b": "hv-a"}[cur.Host]
			var proc **exec.Cmd
			switch victim {
			case "server":
				proc = &c.server
			case "source":
				proc = &c.agents[source].cmd
			default:
				proc = &c.agents[target].cmd
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { _, err := c.op.Migrate(ctx, id, api.MigrateRequest{Host: target}); done <- err }()
			// Kill as the migration's row reaches step (or, if it went
			// past it between two reads, at the step it is at).
			killedAt, finished := store.MigrationStep("done"), false
		watch:
			for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); {
				s := migrationStep(t, st, id)
				if s != "" && slices.Index(steps, s) >= slices.Index(steps, step) {
					killedAt = s
					break
				}
				select {
				case err := <-done:
					if err != nil {
						t.Fatalf("migrating before the kill: %v", err)
					}
					finished = true
					break watch // done before the step was seen
				default:
				}
			}
			stop(*proc, syscall.SIGKILL)
			hit[victim+" at "+string(killedAt)]++
			cancel()
			if !finished {
				<-done
			}

			// One usable copy: where the record says.
			rec := vtpmRecordIn(t, st, id)
			if !hasState(t, c.agents[rec.Host].dir, id) {
				t.Fatalf("%s killed at %s: the record names %s, which holds no state of the vTPM", victim, killedAt, rec.Host)
			}
			if victim == "server" {
				c.startServer()
			} else {
				name := source
				if victim == "target" {
					name = target
				}
				c.startAgent(c.agents[name])
			}
			rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Minute)
			moved, err := c.op.Migrate(rctx, id, api.MigrateRequest{Host: target})
			rcancel()
			if client.ErrorCode(err) == api.CodeTargetIsSource && migrationStep(t, st, id) == "" {
				moved.Host, err = vtpmRecordIn(t, st, id).Host, nil // it had finished: nothing to do
			}
			if err != nil {
				t.Fatalf("%s killed at %s: running the migration again: %v", victim, killedAt, err)
			}
			if moved.Host != target {
				t.Fatalf("%s killed at %s: the vTPM is on %s, want %s", victim, killedAt, moved.Host, target)
			}
			c.onlyOn(id, target)
		}
	}
	t.Logf("kills: %v", hit)
	killedMidway(t, hit)

	if _, err := c.op.Start(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	v = c.wait(id, "active")
	if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, data) {
		t.Fatalf("NV index after %d interrupted moves = %q, want %q", len(steps)*3, got, data)
	}
	checkIdentity(t, c.op, v)
}

func vtpmRecordIn(t *testing.T, st *store.Store, id string) *store.VTPM {
	t.Helper()
	var v *store.VTPM
	if err := st.View(context.Background(), func(tx *store.Tx) (err error) { v, err = tx.GetVTPM(id); return err }); err != nil {
		t.Fatal(err)
	}
	return v
}
