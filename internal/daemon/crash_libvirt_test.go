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

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// libvirtHosts are two libvirt hosts in emulator mode, as
// testLibvirtMigrateEmulator runs them: lv-a on the machine's libvirtd,
// lv-b on a second libvirtd in a mount namespace of its own, with its
// agent in that namespace.
type libvirtHosts struct {
	c   *cluster
	st  *store.Store // the server's, read as another process would
	lv  map[string]*golibvirt.Libvirt
	dir map[string]func(id string) string // libvirt's state directory of a vTPM, seen from here
}

func newLibvirtHosts(t *testing.T) *libvirtHosts {
	t.Helper()
	swtpmtest.Require(t, "tpm2_nvdefine")
	lv := connectLibvirt(t)
	other := startOtherLibvirtd(t)
	c := newCluster(t)
	conf := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(conf, []byte("swtpm-user: tss\nswtpm-group: tss\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	flags := []string{"--config", conf, "--backend", "libvirt", "--libvirt-mode", "emulator", "--enable-vtpm"}
	c.addAgent("lv-a", 4, flags...)
	c.addWrappedAgent(other.nsenter(), "lv-b", 4, append(flags, "--libvirt-socket", other.socket)...)
	st, err := store.OpenPostgres(context.Background(), c.dsn, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return &libvirtHosts{c: c, st: st,
		lv: map[string]*golibvirt.Libvirt{"lv-a": lv, "lv-b": dialLibvirt(t, other.socket)},
		dir: map[string]func(string) string{
			"lv-a": func(id string) string { return filepath.Join("/var/lib/libvirt/swtpm", id) },
			"lv-b": func(id string) string { return other.path(filepath.Join("/var/lib/libvirt/swtpm", id)) },
		}}
}

// other is the host that is not host.
func (h *libvirtHosts) other(host string) string {
	return map[string]string{"lv-a": "lv-b", "lv-b": "lv-a"}[host]
}

// holds says whether host holds a TPM 2.0 state of vTPM id in libvirt's
// state directory.
func (h *libvirtHosts) holds(t *testing.T, host, id string) bool {
	t.Helper()
	_, err := os.Stat(filepath.Join(h.dir[host](id), "tpm2", "tpm2-00.permall"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return err == nil
}

// onlyOn checks that host alone holds vTPM id's state and libvirt secret
// (secret security host keeps it defined, persistent, with its value);
// "" for neither host.
func (h *libvirtHosts) onlyOn(t *testing.T, host, id, secretID string, secret []byte) {
	t.Helper()
	for name, lv := range h.lv {
		value, _, defined := libvirtSecret(t, lv, secretID)
		if held := h.holds(t, name, id); held != (name == host) || defined != (name == host) || defined && !bytes.Equal(value, secret) {
			t.Fatalf("%s holds the state %v, the libvirt secret %v (its value %v); want both on %q alone", name, held, defined, bytes.Equal(value, secret), host)
		}
	}
}

// killAt runs op and kills *proc with SIGKILL, after delay, once at says
// the operation reached a step (and names it), or once op finished
// ("done"); it returns where the kill hit, after op returned.
func killAt(t *testing.T, proc **exec.Cmd, delay time.Duration, op func(ctx context.Context) error, at func() (string, bool)) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- op(ctx) }()
	killedAt, finished := "done", false
watch:
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); {
		if step, ok := at(); ok {
			killedAt = step
			break
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("before the kill: %v", err)
			}
			finished = true
			break watch
		default:
		}
	}
	time.Sleep(delay)
	stop(*proc, syscall.SIGKILL)
	cancel()
	if !finished {
		<-done
	}
	return killedAt
}

// killedMidway fails t when every kill of one victim (hits' keys are
// "VICTIM at STEP") landed once the operation had finished ("done"): the
// crash test would then have shown nothing of a crash mid-operation.
func killedMidway(t *testing.T, hits map[string]int) {
	t.Helper()
	midway := map[string]bool{}
	for k := range hits {
		victim, at, _ := strings.Cut(k, " at ")
		midway[victim] = midway[victim] || at != "done"
	}
	for victim, ok := range midway {
		if !ok {
			t.Errorf("every kill of the %s landed after the operation had finished: %v", victim, hits)
		}
	}
}

// restart starts the killed process again: the server, or a host's agent.
func (h *libvirtHosts) restart(victim string) {
	if victim == "server" {
		h.c.startServer()
		return
	}
	h.c.startAgent(h.c.agents[victim])
}

// proc is the process of victim: the server, or a host's agent.
func (h *libvirtHosts) proc(victim string) **exec.Cmd {
	if victim == "server" {
		return &h.c.server
	}
	return &h.c.agents[victim].cmd
}

// TestCrashMidLibvirtMoves kills, with SIGKILL, the processes taking part
// in the moves of a vTPM between two libvirt hosts in emulator mode
// (secret security host: the host keeps its libvirt secret), at each step
// (the steps are read from the store, as TestCrashMidMigrate reads them),
// and after each kill checks that one usable copy is left and that the
// same command run again finishes the move, with the state and the
// libvirt secret on the new host alone. No guest boots: the moves are
// cold. The NV index and counter written with tpm2-tools before the first
// move read the same after the last, with the EKs of before.
func TestCrashMidLibvirtMoves(t *testing.T) {
	h := newLibvirtHosts(t)
	c, ctx := h.c, context.Background()
	id := uuid.NewString()
	t.Cleanup(func() { os.RemoveAll(h.dir["lv-a"](id)) }) // lv-b's goes with its namespace
	if _, err := c.create(id, "hw:tpm_secret_security", "host"); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	t.Cleanup(func() { // if the test fails with the secret defined on lv-a
		if s, err := h.lv["lv-a"].SecretLookupByUUID(golibvirt.UUID(uuid.MustParse(v.SecretRef))); err == nil {
			h.lv["lv-a"].SecretUndefine(s)
		}
	})
	if _, err := c.op.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "stopped")
	secret, err := clusterKeyring(t, c).Get(ctx, v.SecretRef)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("M"), 32)
	var counter []byte
	onStateSocket(t, filepath.Join(h.dir[v.Host](id), "tpm2"), secret.Payload, func(sock string) { counter = writeNVCounted(t, sock, data) })
	before, err := c.op.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	hits := map[string]int{}

	t.Run("migrate", func(t *testing.T) {
		steps := []store.MigrationStep{store.MigrationStopping, store.MigrationExporting, store.MigrationImporting, store.MigrationCleaning}
		for _, victim := range []string{"server", "source", "target"} {
			for _, step := range steps {
				// A running vTPM's move begins at stopping, a stopped one's
				// at exporting.
				phase, err := "stopped", error(nil)
				if step == store.MigrationStopping {
					phase = "active"
					_, err = c.op.Start(ctx, id)
				} else {
					_, err = c.op.Stop(ctx, id)
				}
				if err != nil {
					t.Fatal(err)
				}
				source := c.wait(id, phase).Host
				target := h.other(source)
				killed := map[string]string{"server": "server", "source": source, "target": target}[victim]
				killedAt := killAt(t, h.proc(killed), 0, func(ctx context.Context) error {
					_, err := c.op.Migrate(ctx, id, api.MigrateRequest{Host: target})
					return err
				}, func() (string, bool) {
					s := migrationStep(t, h.st, id)
					return string(s), s != "" && slices.Index(steps, s) >= slices.Index(steps, step)
				})
				hits[victim+" at "+killedAt]++

				// One usable copy: where the record says.
				if rec := vtpmRecordIn(t, h.st, id); !h.holds(t, rec.Host, id) {
					t.Fatalf("%s killed at %s: the record names %s, which holds no state of the vTPM", victim, killedAt, rec.Host)
				}
				h.restart(killed)
				rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
				moved, err := c.op.Migrate(rctx, id, api.MigrateRequest{Host: target})
				cancel()
				if client.ErrorCode(err) == api.CodeTargetIsSource && migrationStep(t, h.st, id) == "" {
					moved.Host, err = vtpmRecordIn(t, h.st, id).Host, nil // it had finished: nothing to do
				}
				if err != nil {
					t.Fatalf("%s killed at %s: running the migration again: %v", victim, killedAt, err)
				}
				if moved.Host != target {
					t.Fatalf("%s killed at %s: the vTPM is on %s, want %s", victim, killedAt, moved.Host, target)
				}
				h.onlyOn(t, target, id, v.SecretRef, secret.Payload)
			}
		}
	})

	// Shelve from the vTPM's host, then unshelve onto the other; the
	// server or that host's agent killed at each step of each.
	t.Run("shelve", func(t *testing.T) {
		shelved := func(rec *store.VTPM) bool {
			err := h.st.View(ctx, func(tx *store.Tx) error { _, err := tx.GetShelved(id, rec.Incarnation); return err })
			if err != nil && !errors.Is(err, store.ErrNotFound) {
				t.Fatal(err)
			}
			return err == nil
		}
		type step struct {
			name  string
			delay time.Duration
			at    func(rec *store.VTPM, host string) bool
		}
		shelveSteps := []step{
			{"shelving", 0, func(rec *store.VTPM, _ string) bool { return rec.Phase == store.PhaseShelving }},
			{"bundle kept", 0, func(rec *store.VTPM, _ string) bool { return shelved(rec) }},
			{"shelved", 0, func(rec *store.VTPM, _ string) bool { return rec.Phase == store.PhaseShelved }},
		}
		unshelveSteps := []step{
			{"placed", 0, func(rec *store.VTPM, host string) bool { return rec.Phase == store.PhaseUnshelving && rec.Host == host }},
			{"taking it in", 40 * time.Millisecond, func(rec *store.VTPM, host string) bool { return rec.Phase == store.PhaseUnshelving && rec.Host == host }},
			{"there", 0, func(rec *store.VTPM, host string) bool { return rec.Host == host && rec.Phase == store.PhaseStopped }},
		}
		// oneCopy checks that the record's host holds the state, or the
		// servers the shelved bundle.
		oneCopy := func(what string) {
			t.Helper()
			rec := vtpmRecordIn(t, h.st, id)
			switch rec.Phase {
			case store.PhaseShelved, store.PhaseUnshelving:
				if !shelved(rec) {
					t.Fatalf("%s: %s without a shelved bundle", what, rec.Phase)
				}
			case store.PhaseShelving:
				if !shelved(rec) && !h.holds(t, rec.Host, id) {
					t.Fatalf("%s: shelving, with no bundle kept and no state on %s", what, rec.Host)
				}
			default:
				if !h.holds(t, rec.Host, id) || shelved(rec) {
					t.Fatalf("%s: %s on %s, holding the state %v, a shelved bundle left %v", what, rec.Phase, rec.Host, h.holds(t, rec.Host, id), shelved(rec))
				}
			}
		}
		for _, victim := range []string{"server", "agent"} {
			for i := range shelveSteps {
				from := c.wait(id, "stopped").Host
				to := h.other(from)

				s := shelveSteps[i]
				killed := map[string]string{"server": "server", "agent": from}[victim]
				killedAt := killAt(t, h.proc(killed), s.delay, func(ctx context.Context) error {
					_, err := c.op.Shelve(ctx, id)
					return err
				}, func() (string, bool) { return s.name, s.at(vtpmRecordIn(t, h.st, id), from) })
				hits["shelve, "+victim+" at "+killedAt]++
				oneCopy("shelve, " + victim + " killed at " + killedAt)
				h.restart(killed)
				if _, err := c.op.Shelve(ctx, id); err != nil && client.ErrorCode(err) != api.CodeVTPMShelved {
					t.Fatalf("shelve, %s killed at %s: shelving again: %v", victim, killedAt, err)
				}
				if rec := vtpmRecordIn(t, h.st, id); rec.Phase != store.PhaseShelved || rec.Host != "" || !shelved(rec) {
					t.Fatalf("shelve, %s killed at %s: after shelving again: %s on %q, bundle kept %v", victim, killedAt, rec.Phase, rec.Host, shelved(rec))
				}
				h.onlyOn(t, "", id, v.SecretRef, secret.Payload)

				s = unshelveSteps[i]
				killed = map[string]string{"server": "server", "agent": to}[victim]
				killedAt = killAt(t, h.proc(killed), s.delay, func(ctx context.Context) error {
					_, err := c.op.Unshelve(ctx, id, to)
					return err
				}, func() (string, bool) { return s.name, s.at(vtpmRecordIn(t, h.st, id), to) })
				hits["unshelve, "+victim+" at "+killedAt]++
				oneCopy("unshelve, " + victim + " killed at " + killedAt)
				h.restart(killed)
				if _, err := c.op.Unshelve(ctx, id, to); err != nil && client.ErrorCode(err) != api.CodeVTPMNotShelved {
					t.Fatalf("unshelve, %s killed at %s: unshelving again: %v", victim, killedAt, err)
				}
				if rec := c.wait(id, "stopped"); rec.Host != to {
					t.Fatalf("unshelve, %s killed at %s: stopped on %s, want %s", victim, killedAt, rec.Host, to)
				}
				h.onlyOn(t, to, id, v.SecretRef, secret.Payload)
			}
		}
	})
	t.Logf("kills: %v", hits)
	killedMidway(t, hits)

	rec := vtpmRecordIn(t, h.st, id)
	onStateSocket(t, filepath.Join(h.dir[rec.Host](id), "tpm2"), secret.Payload, func(sock string) {
		if got := readNVData(t, sock); !bytes.Equal(got, data) {
			t.Fatalf("NV index after the interrupted moves = %q, want %q", got, data)
		}
		if got := readCounter(t, sock); !bytes.Equal(got, counter) {
			t.Fatalf("NV counter after the interrupted moves = %x, want %x", got, counter)
		}
	})
	after, err := c.op.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	sameEKs(t, before, after)
}
