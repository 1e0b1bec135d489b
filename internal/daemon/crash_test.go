package daemon

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// vtpmdProcess is the vtpmd binary running as its own process, so that a
// test can kill -9 it.
type vtpmdProcess struct {
	cmd *exec.Cmd
	c   *client.Client
}

func buildVtpmd(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "vtpmd")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/vtpmd/vtpmd/cmd/vtpmd").CombinedOutput()
	if err != nil {
		t.Fatalf("building vtpmd: %v\n%s", err, out)
	}
	return bin
}

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// runVtpmd starts vtpmd all-in-one on dir and returns once its API answers.
func runVtpmd(t *testing.T, bin, dir string) *vtpmdProcess {
	t.Helper()
	addr := freeAddr(t)
	cmd := exec.Command(bin, "all-in-one", "--data-dir", dir, "--listen", addr, "--host-name", "test-host", "--log-level", "error")
	logPath := filepath.Join(t.TempDir(), "vtpmd.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("vtpmd output:\n%s", b)
		}
	})
	p := &vtpmdProcess{cmd: cmd, c: client.New("unix://"+filepath.Join(dir, "api.sock"), "")}
	t.Cleanup(func() { p.signal(syscall.SIGKILL) })
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		if _, err := p.c.Hosts(context.Background()); err == nil {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatal("vtpmd did not answer within a minute")
		}
	}
}

// signal sends sig and waits for vtpmd to exit.
func (p *vtpmdProcess) signal(sig syscall.Signal) {
	if p.cmd.ProcessState != nil {
		return
	}
	p.cmd.Process.Signal(sig)
	p.cmd.Wait()
}

func createRequest(id string) api.CreateVTPMRequest {
	return api.CreateVTPMRequest{InstanceID: id, Project: "p1",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}}
}

// TestCrashMidCreate kills vtpmd with SIGKILL at moments spread over a
// create (before the record is committed, while the TPM is manufactured or
// taken from the default pool, after), then checks that the restarted daemon leaves nothing half-made:
// every create either completes or left no trace and can be made again, no
// swtpm outlives its vtpmd, and no secret is orphaned.
func TestCrashMidCreate(t *testing.T) {
	swtpmtest.Require(t)
	bin := buildVtpmd(t)
	dir := t.TempDir()
	var ids []string
	for n, delay := range []time.Duration{0, 1, 3, 6, 10, 15, 20, 30, 40, 60, 90, 0, 1, 3, 6, 10, 15, 20, 30} {
		p := runVtpmd(t, bin, dir)
		if n%2 == 1 {
			waitPool(t, dir, 1) // this create takes a pooled TPM
		}
		id := uuid.NewString()
		ids = append(ids, id)
		go p.c.Create(context.Background(), createRequest(id))
		time.Sleep(delay * time.Millisecond)
		p.signal(syscall.SIGKILL)
		swtpmtest.CheckNoProcesses(t, dir) // swtpm dies with its vtpmd
	}

	p := runVtpmd(t, bin, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	retried := 0
	var refs []string // the vTPMs' secrets
	for _, id := range ids {
		_, err := p.c.Get(ctx, id)
		switch {
		case client.IsNotFound(err):
			// The create never took: it can simply be made again.
			retried++
			if _, err := p.c.Create(ctx, createRequest(id)); err != nil {
				t.Fatalf("retrying the create of %s: %v", id, err)
			}
		case err != nil:
			t.Fatal(err)
		default:
			// It took: a retry is a duplicate, and the vTPM completes.
			if _, err := p.c.Create(ctx, createRequest(id)); !client.IsConflict(err) {
				t.Fatalf("repeating a create that took: want 409, got %v", err)
			}
		}
		v, err := p.c.Wait(ctx, id, func(v api.VTPM) bool { return v.Phase == "active" || v.Phase == "error" }, nil)
		if err != nil || v.Phase != "active" {
			t.Fatalf("%s after restart: %v (phase %s, reason %q)", id, err, v.Phase, v.Reason)
		}
		checkIdentity(t, p.c, v)
		refs = append(refs, v.SecretRef)
	}
	adopted := 0
	for _, id := range ids {
		evs, _ := p.c.Events(ctx, id)
		for _, e := range evs.Items {
			if e.Action == "adopted a pre-manufactured TPM" {
				adopted++
			}
		}
	}
	t.Logf("%d of %d creates had not taken when vtpmd was killed; %d vTPMs are pooled TPMs", retried, len(ids), adopted)
	if adopted == 0 {
		t.Fatal("no create took a pooled TPM: the pool path went untested")
	}

	// One state directory and one swtpm per vTPM, nothing else.
	entries, err := os.ReadDir(filepath.Join(dir, "vtpms"))
	if err != nil {
		t.Fatal(err)
	}
	var dirs []string
	for _, e := range entries {
		if e.Name() != ".pool" { // the default pool of manufactured TPMs
			dirs = append(dirs, e.Name())
		}
	}
	want := append([]string(nil), ids...)
	sort.Strings(want)
	if fmt.Sprint(dirs) != fmt.Sprint(want) {
		t.Fatalf("state directories %v, want %v", dirs, want)
	}
	var procs []string
	for _, p := range swtpmtest.Processes(dir) {
		if !strings.Contains(p, "/.pool/") {
			procs = append(procs, p)
		}
	}
	if len(procs) != len(ids) {
		t.Fatalf("%d swtpm processes for %d vTPMs: %v", len(procs), len(ids), procs)
	}

	// One secret per vTPM once the orphans are reclaimed: a create that
	// died between making its secret and committing its record left one,
	// which the restarted daemon keeps until it is orphanAge old (it could
	// be another server's create in flight), then deletes. Reclaimed here
	// as if that time had passed: nothing but the orphans may go.
	p.signal(syscall.SIGTERM)
	swtpmtest.CheckNoProcesses(t, dir)
	kr := openKeyring(t, dir)
	st, err := store.Open(ctx, filepath.Join(dir, "vtpmd.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	before, _ := kr.List(ctx)
	if err := reclaimSecrets(ctx, st, kr, 0, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	secrets, err := kr.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d orphan secrets reclaimed", len(before)-len(secrets))
	if len(secrets) != len(ids) {
		t.Fatalf("%d vTPM secrets for %d vTPMs", len(secrets), len(ids))
	}
	for _, ref := range refs {
		if !slices.Contains(secrets, ref) {
			t.Errorf("a vTPM's secret %s was reclaimed", ref)
		}
	}
}

// TestWrongSecret swaps the secrets of two manufactured vTPMs, as a key
// manager mix-up would: swtpm must refuse each state, vtpmd must say so, and
// the states must stay byte for byte as they were, so that putting the
// secrets back brings both TPMs back with their data.
func TestWrongSecret(t *testing.T) {
	dir := t.TempDir()
	u := startDaemon(t, dir)
	ids := []string{"0a0a0a0a-0000-4000-8000-00000000bad1", "0a0a0a0a-0000-4000-8000-00000000bad2"}
	before := map[string][]byte{}
	for _, id := range ids {
		v := u.create(t, id, "2.0")
		withTPM(t, v.Sockets.Data, func(tpm transport.TPM) { nvWrite(t, tpm, []byte(id)) })
	}
	u.stop()
	state := func(id string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, "vtpms", id, "tpm2-00.permall"))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, id := range ids {
		before[id] = state(id)
	}

	swapSecrets(t, dir, ids[0], ids[1])
	u = startDaemon(t, dir)
	for _, id := range ids {
		v := u.wait(t, id, "error")
		if !strings.Contains(v.Reason, swtpm.ErrWrongSecret.Error()) {
			t.Fatalf("reason %q does not say the secret is wrong", v.Reason)
		}
		if pid := u.d.Swtpm().Running(id); pid != 0 {
			t.Fatalf("a swtpm (%d) runs on a state it cannot open", pid)
		}
	}
	u.stop()
	for _, id := range ids {
		if !bytes.Equal(state(id), before[id]) {
			t.Fatalf("the state of %s changed under a wrong secret", id)
		}
	}

	swapSecrets(t, dir, ids[0], ids[1])
	u = startDaemon(t, dir)
	for _, id := range ids {
		v := u.wait(t, id, "active")
		if got := readUserNV(t, v); string(got) != id {
			t.Fatalf("NV of %s after its secret came back = %q", id, got)
		}
	}
}

// swapSecrets exchanges the secret references of two vTPM records while
// the daemon is stopped.
func swapSecrets(t *testing.T, dir, a, b string) {
	t.Helper()
	st, err := store.Open(context.Background(), filepath.Join(dir, "vtpmd.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	err = st.Update(context.Background(), func(tx *store.Tx) error {
		va, err := tx.GetVTPM(a)
		if err != nil {
			return err
		}
		vb, err := tx.GetVTPM(b)
		if err != nil {
			return err
		}
		va.SecretID, vb.SecretID = vb.SecretID, va.SecretID
		if err := tx.UpdateVTPM(va); err != nil {
			return err
		}
		return tx.UpdateVTPM(vb)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestReclaimOrphanSecret plants what a create killed between making its
// secret and committing its record leaves behind: the restarted daemon
// deletes it once it is older than orphanAge, and keeps the secrets in
// use; a younger one may be another server's create in flight, and stays.
func TestReclaimOrphanSecret(t *testing.T) {
	dir := t.TempDir()
	u := startDaemon(t, dir)
	id := "0a0a0a0a-0000-4000-8000-0000000000a1"
	v := u.create(t, id, "2.0")
	// A key broker secret's payload is in use too.
	brokered, err := u.c.CreateBrokerSecret(context.Background(), api.CreateBrokerSecretRequest{Name: "disk", Project: "p1", Payload: []byte("k"), ReleaseTo: []string{id}})
	if err != nil {
		t.Fatal(err)
	}
	u.stop()
	kr := openKeyring(t, dir)
	ctx := context.Background()
	payload, _ := keyring.NewVTPMSecret()
	orphan, err := kr.Create(ctx, "p1", "", payload)
	if err != nil {
		t.Fatal(err)
	}
	kept, _ := kr.List(ctx)
	st, err := store.Open(ctx, filepath.Join(dir, "vtpmd.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := reclaimSecrets(ctx, st, kr, orphanAge, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	if left, _ := kr.List(ctx); !slices.Equal(left, kept) {
		t.Fatalf("a fresh orphan was reclaimed: %v, want %v", left, kept)
	}

	defer func(age time.Duration) { orphanAge = age }(orphanAge)
	orphanAge = 0
	u = startDaemon(t, dir)
	u.wait(t, id, "active")
	left, err := kr.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != len(kept)-1 || slices.Contains(left, orphan) || !slices.Contains(left, v.SecretRef) {
		t.Fatalf("secrets after restart %v; orphan %s, in use %s", left, orphan, v.SecretRef)
	}
	if len(left) != 2 {
		t.Fatalf("%d secrets left, want the vTPM's and broker secret %s's payload", len(left), brokered.Name)
	}
}

// A running server reclaims orphan secrets, not only one starting: of
// replicas sharing a store, one killed mid-create is restarted before its
// orphan is old enough, and the others may run on for months. The server
// holding the reclaim's lease does it.
func TestReclaimOrphansWhileRunning(t *testing.T) {
	defer func(age, every time.Duration) { orphanAge, reclaimInterval = age, every }(orphanAge, reclaimInterval)
	orphanAge, reclaimInterval = 0, 20*time.Millisecond
	ctx := context.Background()
	s, err := StartServer(ctx, Config{DataDir: t.TempDir(), Listen: "127.0.0.1:0", HostName: "control"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(ctx)
	payload, _ := keyring.NewVTPMSecret()
	orphan, err := s.keyring.Create(ctx, "p1", "", payload) // as a create killed before its commit leaves it
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		held, err := s.keyring.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(held, orphan) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the orphan secret is still there after a minute")
		}
	}
	var holder string
	if err := s.store.View(ctx, func(tx *store.Tx) (err error) { holder, _, err = tx.LeaseHolder(orphanSweep); return err }); err != nil || holder == "" {
		t.Fatalf("the reclaim's lease: %q %v", holder, err)
	}
}
