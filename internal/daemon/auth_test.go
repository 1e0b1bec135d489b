package daemon

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/cli"
)

// TestLocalUsers: another user on the host, here nobody, is not the
// operator and not a tenant. The operator's socket refuses to let it
// connect, and the network API serves it only what it serves anyone:
// minting a host credential (which would release tenants' keys) answers
// 401 and changes nothing. The data dir is made private even when it
// existed with the default umask's mode, and so are the SQLite files.
func TestLocalUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		citest.Missing(t, "running as another user needs root")
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		citest.Missing(t, "no user nobody")
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)

	dir := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	u := startConfigured(t, Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "test-host"})
	u.create(t, "3f1e0a52-7c1b-4d25-9a5e-0c7d2b9e4a11", "2.0")
	for path, want := range map[string]os.FileMode{
		dir: os.ModeDir | 0o700, filepath.Join(dir, "api.sock"): os.ModeSocket | 0o600,
		filepath.Join(dir, "vtpmd.db"): 0o600, filepath.Join(dir, "vtpmd.db-wal"): 0o600, filepath.Join(dir, "vtpmd.db-shm"): 0o600,
	} {
		if fi, err := os.Stat(path); err != nil || fi.Mode() != want {
			t.Errorf("%s: %v %v, want %v", filepath.Base(path), fi.Mode(), err, want)
		}
	}

	// vtpmctl, run as nobody from a directory it may read.
	bin, err := os.MkdirTemp("", "vtpmctl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(bin) })
	os.Chmod(bin, 0o755)
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/vtpmd/vtpmd/cmd/vtpmctl").CombinedOutput(); err != nil {
		t.Fatalf("building vtpmctl: %v\n%s", err, out)
	}
	asNobody := func(args ...string) (int, string) {
		cmd := exec.Command(filepath.Join(bin, "vtpmctl"), args...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
		cmd.Env = []string{"PATH=/usr/bin:/bin"}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatalf("running vtpmctl as nobody: %v", err)
		}
		return cmd.ProcessState.ExitCode(), string(out)
	}
	if code, out := asNobody("--server", u.d.OperatorURL, "list"); code != cli.ExitUnreachable || !strings.Contains(out, "permission denied") {
		t.Errorf("nobody on the operator's socket: exit %d %s", code, out)
	}
	for _, args := range [][]string{
		{"list"}, {"hosts"}, {"hyperv", "host-token", "test-host"}, {"--project", "p1", "list"},
	} {
		code, out := asNobody(append([]string{"--server", u.d.URL}, args...)...)
		if code != cli.ExitFailed || !strings.Contains(out, "unauthenticated") {
			t.Errorf("nobody: vtpmctl %s: exit %d %s", strings.Join(args, " "), code, out)
		}
	}
	evs, err := u.c.Events(context.Background(), "3f1e0a52-7c1b-4d25-9a5e-0c7d2b9e4a11")
	if err != nil || len(evs.Items) == 0 || !strings.HasPrefix(evs.Items[0].Actor, `api:operator ("uid 0 root")`) {
		t.Errorf("events: %+v %v, want the create by root on the operator's socket", evs, err)
	}
}
