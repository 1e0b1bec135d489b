package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cli"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// The NV index and NV counter the backup tests write through a vTPM's
// socket with tpm2-tools, an independent client.
const (
	backupDataIndex    = "0x1500016"
	backupCounterIndex = "0x1500017"
)

// tools runs a tpm2-tools command against the swtpm at sock.
func tools(t *testing.T, sock string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=swtpm:path="+sock)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// writeNV writes data (32 bytes) to the data index, defining it first if
// define.
func writeNV(t *testing.T, sock string, data []byte, define bool) {
	t.Helper()
	if define {
		tools(t, sock, "tpm2_nvdefine", backupDataIndex, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
		tools(t, sock, "tpm2_nvdefine", backupCounterIndex, "-C", "o", "-s", "8", "-a", "nt=counter|ownerread|ownerwrite")
	}
	f := filepath.Join(t.TempDir(), "nv")
	if err := os.WriteFile(f, data, 0o600); err != nil {
		t.Fatal(err)
	}
	tools(t, sock, "tpm2_nvwrite", backupDataIndex, "-C", "o", "-i", f)
}

func readNVData(t *testing.T, sock string) []byte {
	t.Helper()
	f := filepath.Join(t.TempDir(), "nv")
	tools(t, sock, "tpm2_nvread", backupDataIndex, "-C", "o", "-s", "32", "-o", f)
	data, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func increment(t *testing.T, sock string) {
	t.Helper()
	tools(t, sock, "tpm2_nvincrement", backupCounterIndex, "-C", "o")
}

func readCounter(t *testing.T, sock string) []byte {
	t.Helper()
	f := filepath.Join(t.TempDir(), "ctr")
	tools(t, sock, "tpm2_nvread", backupCounterIndex, "-C", "o", "-s", "8", "-o", f)
	data, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// stateOf reads the vTPM's state files on its host, by name.
func stateOf(t *testing.T, dir, id string) map[string][]byte {
	t.Helper()
	var found string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() && d.Name() == id {
			found = p
		}
		return nil
	})
	if found == "" {
		t.Fatalf("no state directory of %s under %s", id, dir)
	}
	out := map[string][]byte{}
	for _, name := range []string{"tpm2-00.permall", "identity.json"} {
		data, err := os.ReadFile(filepath.Join(found, name))
		if err != nil {
			t.Fatal(err)
		}
		out[name] = data
	}
	return out
}

func sameState(a, b map[string][]byte) bool {
	for k, v := range a {
		if !bytes.Equal(v, b[k]) {
			return false
		}
	}
	return len(a) == len(b)
}

func wantCode(t *testing.T, err error, code api.Code) {
	t.Helper()
	if client.ErrorCode(err) != code {
		t.Fatalf("err = %v, want %s", err, code)
	}
}

// TestBackupRestore writes an NV index and an NV counter through a real
// vTPM's socket with tpm2-tools, backs the vTPM up, changes both, restores
// the backup and reads the old values back, with the same endorsement
// keys. A changed byte, another vTPM's bundle and an old generation are
// refused with their codes, by the server and by the host's agent, and
// leave the host's state as it was.
func TestBackupRestore(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	dir := t.TempDir()
	u := startDaemon(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const id, other = "5b0f6a52-1c1e-4d57-9a42-0d1b5c7e2a01", "5b0f6a52-1c1e-4d57-9a42-0d1b5c7e2a02"
	u.create(t, id, "2.0")
	u.create(t, other, "2.0")
	v := u.wait(t, id, "active")
	u.wait(t, other, "active")
	ident, err := u.c.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}

	before := bytes.Repeat([]byte("B"), 32)
	writeNV(t, v.Sockets.Data, before, true)
	increment(t, v.Sockets.Data)
	counterBefore := readCounter(t, v.Sockets.Data)
	b1, err := u.c.CreateBackup(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if b1.Generation != 1 || b1.Reason != "manual" || b1.SourceHost != "test-host" || b1.Size == 0 {
		t.Fatalf("backup = %+v", b1)
	}

	writeNV(t, v.Sockets.Data, bytes.Repeat([]byte("A"), 32), false)
	increment(t, v.Sockets.Data)
	increment(t, v.Sockets.Data)

	// Restoring a running vTPM is refused.
	_, err = u.c.RestoreBackup(ctx, id, api.RestoreRequest{})
	wantCode(t, err, api.CodeVTPMNotStopped)

	if _, err := u.c.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "stopped")
	if r, err := u.c.RestoreBackup(ctx, id, api.RestoreRequest{}); err != nil || r.Generation != 1 {
		t.Fatalf("restore = %+v, %v", r, err)
	}
	if _, err := u.c.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	v = u.wait(t, id, "active")
	if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, before) {
		t.Fatalf("NV after restore = %q, want %q", got, before)
	}
	if got := readCounter(t, v.Sockets.Data); !bytes.Equal(got, counterBefore) {
		t.Fatalf("NV counter after restore = %x, want %x", got, counterBefore)
	}
	after, err := u.c.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if len(after.EKs) != len(ident.EKs) || after.EKs[0].PublicKeyPEM != ident.EKs[0].PublicKeyPEM || after.EKs[0].CertificatePEM != ident.EKs[0].CertificatePEM {
		t.Fatal("the restored vTPM's endorsement keys changed")
	}
	checkIdentity(t, u.c, v) // the TPM holds the EKs (and certificates) on record

	// A second backup makes generation 1 stale.
	if b2, err := u.c.CreateBackup(ctx, id); err != nil || b2.Generation != 2 {
		t.Fatalf("second backup = %+v, %v", b2, err)
	}
	if _, err := u.c.CreateBackup(ctx, other); err != nil {
		t.Fatal(err)
	}
	if _, err := u.c.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "stopped")
	onHost := stateOf(t, dir, id)

	_, err = u.c.RestoreBackup(ctx, id, api.RestoreRequest{Generation: 1})
	wantCode(t, err, api.CodeStaleBundle)
	_, err = u.c.RestoreBackup(ctx, id, api.RestoreRequest{Generation: 9})
	wantCode(t, err, api.CodeBackupNotFound)

	// Bundles planted among the vTPM's backups: one with a byte changed,
	// and the other vTPM's. The server refuses them before any host sees
	// them; its agent refuses them too, handed them directly.
	st := u.d.store
	var good, others []byte
	err = st.View(ctx, func(tx *store.Tx) error {
		a, err := tx.GetVTPM(id)
		if err != nil {
			return err
		}
		b, err := tx.GetBackup(a.InstanceID, a.Incarnation, 2)
		if err != nil {
			return err
		}
		o, err := tx.GetVTPM(other)
		if err != nil {
			return err
		}
		ob, err := tx.GetBackup(o.InstanceID, o.Incarnation, 0)
		if err != nil {
			return err
		}
		good, others = b.Bundle, ob.Bundle
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	tampered := bytes.Clone(good)
	tampered[len(tampered)-100] ^= 0x40
	rec := u.vtpmRecord(t, id)
	err = st.Update(ctx, func(tx *store.Tx) error {
		if err := tx.PutBackup(&store.Backup{InstanceID: id, Incarnation: rec.Incarnation, Generation: 50, Reason: "manual", CreatedAt: time.Now(), Bundle: tampered}, 10); err != nil {
			return err
		}
		return tx.PutBackup(&store.Backup{InstanceID: id, Incarnation: rec.Incarnation, Generation: 51, Reason: "manual", CreatedAt: time.Now(), Bundle: others}, 10)
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = u.c.RestoreBackup(ctx, id, api.RestoreRequest{Generation: 50, AllowRollback: true})
	wantCode(t, err, api.CodeBundleCorrupt)
	_, err = u.c.RestoreBackup(ctx, id, api.RestoreRequest{Generation: 51, AllowRollback: true})
	wantCode(t, err, api.CodeBundleMismatch)
	for _, tc := range []struct {
		name string
		data []byte
		gen  int64
		want api.Code
	}{
		{"a changed byte", tampered, 2, api.CodeBundleCorrupt},
		{"truncated", good[:len(good)-1], 2, api.CodeBundleCorrupt},
		{"another vTPM's", others, 1, api.CodeBundleMismatch},
	} {
		if got := u.askImport(t, rec, tc.data, tc.gen); got.Code != string(tc.want) {
			t.Fatalf("%s: the agent answered %q (%s), want %s", tc.name, got.Code, got.Message, tc.want)
		}
	}
	if !sameState(onHost, stateOf(t, dir, id)) {
		t.Fatal("a refused bundle changed the state on the host")
	}

	// An explicit rollback restores generation 1, recorded with who.
	if _, err := u.c.RestoreBackup(ctx, id, api.RestoreRequest{Generation: 1, AllowRollback: true}); err != nil {
		t.Fatal(err)
	}
	evs, err := u.c.Events(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var rolled bool
	for _, e := range evs.Items {
		rolled = rolled || e.Action == "rollback allowed" && strings.Contains(e.Detail, e.Actor)
	}
	if !rolled {
		t.Fatalf("no rollback event naming its actor in %+v", evs.Items)
	}
	if _, err := u.c.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	v = u.wait(t, id, "active")
	if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, before) {
		t.Fatalf("NV after rollback = %q, want %q", got, before)
	}
}

func (u *daemonUnderTest) vtpmRecord(t *testing.T, id string) *store.VTPM {
	t.Helper()
	var v *store.VTPM
	err := u.d.store.View(context.Background(), func(tx *store.Tx) (err error) { v, err = tx.GetVTPM(id); return err })
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// askImport hands the agent of v's host data to import as generation gen,
// directly (as a server that did not check it would), and returns its
// answer.
func (u *daemonUnderTest) askImport(t *testing.T, v *store.VTPM, data []byte, gen int64) *store.Transfer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ask := &store.Transfer{Host: v.Host, InstanceID: v.InstanceID, Incarnation: v.Incarnation, Kind: store.TransferImport, Generation: gen, Bundle: data}
	if err := u.d.store.Update(ctx, func(tx *store.Tx) error { return tx.AskTransfer(ask) }); err != nil {
		t.Fatal(err)
	}
	defer u.d.store.Update(ctx, func(tx *store.Tx) error { return tx.WithdrawTransfer(ask.ID) })
	for {
		var got *store.Transfer
		if err := u.d.store.View(ctx, func(tx *store.Tx) (err error) { got, err = tx.GetTransfer(v.Host, ask.ID); return err }); err != nil {
			t.Fatal(err)
		}
		if got.Answered {
			return got
		}
		select {
		case <-ctx.Done():
			t.Fatal("the agent did not answer")
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestPeriodicBackups runs the servers' backups every second: a running
// vTPM is backed up periodically, and a stopped one once more when it
// stops, keeping the newest backup-keep.
func TestPeriodicBackups(t *testing.T) {
	u := startConfigured(t, Config{DataDir: t.TempDir(), Listen: "127.0.0.1:0", HostName: "test-host", BackupInterval: new(time.Second), BackupKeep: 2})
	const id = "5b0f6a52-1c1e-4d57-9a42-0d1b5c7e2a03"
	u.create(t, id, "2.0")
	u.wait(t, id, "active")
	backups := func(want func([]api.Backup) bool) []api.Backup {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for {
			l, err := u.c.Backups(context.Background(), id)
			if err != nil {
				t.Fatal(err)
			}
			if want(l.Items) {
				return l.Items
			}
			if time.Now().After(deadline) {
				t.Fatalf("backups: %+v", l.Items)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	got := backups(func(bs []api.Backup) bool { return len(bs) == 2 && bs[0].Reason == "periodic" && bs[0].Generation >= 2 })
	if got[0].Generation <= got[1].Generation {
		t.Fatalf("backups not newest first: %+v", got)
	}
	if _, err := u.c.Stop(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "stopped")
	backups(func(bs []api.Backup) bool { return len(bs) == 2 && bs[0].Reason == "stop" })
}

// TestClusterBackup backs up and restores a vTPM on a host whose agent
// is its own vtpmd process, reached over the agent protocol (mTLS) by a
// server on PostgreSQL: the agent reads the secret and the bundle for the
// transfer and answers over HTTPS.
func TestClusterBackup(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	c := newCluster(t)
	ctx := context.Background()
	c.addAgent("hv-a", 2)
	id := clusterID(40)
	if _, err := c.create(id); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	before := bytes.Repeat([]byte("C"), 32)
	writeNV(t, v.Sockets.Data, before, true)
	// Through vtpmctl, as an operator runs them.
	var b api.Backup
	if code, out, errOut := c.vtpmctl("-o", "json", "backup", "create", id); code != cli.ExitOK || json.Unmarshal([]byte(out), &b) != nil ||
		b.Generation != 1 || b.SourceHost != "hv-a" || b.Size == 0 {
		t.Fatalf("vtpmctl backup create: exit %d\n%s%s", code, out, errOut)
	}
	writeNV(t, v.Sockets.Data, bytes.Repeat([]byte("D"), 32), false)
	if code, out, errOut := c.vtpmctl("backup", "restore", id); code != cli.ExitConflict || !strings.Contains(errOut, string(api.CodeVTPMNotStopped)) {
		t.Fatalf("vtpmctl backup restore of a running vTPM: exit %d\n%s%s", code, out, errOut)
	}
	if _, err := c.op.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "stopped")
	if code, out, errOut := c.vtpmctl("backup", "create", id); code != cli.ExitOK || !strings.Contains(out, "\n2 ") {
		t.Fatalf("vtpmctl backup create, stopped: exit %d\n%s%s", code, out, errOut)
	}
	if code, out, errOut := c.vtpmctl("backup", "list", id); code != cli.ExitOK || !regexp.MustCompile(`^GENERATION.*\n2 .*manual.*hv-a.*\n1 .*manual.*hv-a.*\n$`).MatchString(out) {
		t.Fatalf("vtpmctl backup list, newest first: exit %d\n%s%s", code, out, errOut)
	}
	if code, out, errOut := c.vtpmctl("backup", "restore", id, "--generation", "1"); code != cli.ExitConflict || !strings.Contains(errOut, string(api.CodeStaleBundle)) {
		t.Fatalf("vtpmctl backup restore of an old generation: exit %d\n%s%s", code, out, errOut)
	}
	if code, out, errOut := c.vtpmctl("backup", "restore", id, "--generation", "1", "--allow-rollback"); code != cli.ExitOK || !strings.HasPrefix(out, "restored generation 1 (taken ") {
		t.Fatalf("vtpmctl backup restore --allow-rollback: exit %d\n%s%s", code, out, errOut)
	}
	if _, err := c.op.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	v = c.wait(id, "active")
	if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, before) {
		t.Fatalf("NV after restore = %q, want %q", got, before)
	}
}
