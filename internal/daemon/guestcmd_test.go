package daemon

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// TestGuestCommands runs the vtpm-guest binary as a tenant would, against
// vtpmd all-in-one on an attested host, with a vTPM vtpmd made (its swtpm
// data socket standing in for /dev/tpmrm0): register and attest once;
// secret get to a file and to standard output, through the registration
// the agent left in its state directory; watch --on-revoke running the
// action and removing the file when the host turns untrusted; secret get
// refused afterwards, with the reason. swtpm serves one connection at a
// time, so the commands run one after another, as a guest's would not
// need to behind /dev/tpmrm0.
func TestGuestCommands(t *testing.T) {
	dir := t.TempDir()
	th := newTestHost(t, dir, "host kernel 6.1")
	u := startConfigured(t, th.attests(Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "test-host"}))
	ctx := context.Background()
	id := "0a0a0a0a-0000-4000-8000-00000000c0de"
	v := u.create(t, id, "2.0")
	log := firmwareLog(t)
	logPath := filepath.Join(dir, "binary_bios_measurements")
	os.WriteFile(logPath, log, 0o644)
	conn, err := net.Dial("unix", v.Sockets.Data)
	if err != nil {
		t.Fatal(err)
	}
	boot(t, swtpm.Retrying(transport.FromReadWriter(conn)), log)
	conn.Close()

	bin := filepath.Join(t.TempDir(), "vtpm-guest")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/vtpmd/vtpmd/cmd/vtpm-guest").CombinedOutput(); err != nil {
		t.Fatalf("building vtpm-guest: %v\n%s", err, out)
	}
	state := t.TempDir()
	common := []string{"--server", u.d.URL, "--instance", id, "--tpm", "unix:" + v.Sockets.Data, "--state-dir", state}
	guest := func(args ...string) (stdout, stderr string, code int) {
		t.Helper()
		var o, e bytes.Buffer
		cmd := exec.Command(bin, append(args, common...)...)
		cmd.Stdout, cmd.Stderr = &o, &e
		err := cmd.Run()
		if _, exited := err.(*exec.ExitError); err != nil && !exited {
			t.Fatalf("vtpm-guest %s: %v", args[0], err)
		}
		return o.String(), e.String(), cmd.ProcessState.ExitCode()
	}
	once := []string{"--once", "--event-log", logPath, "--ima-log", ""}

	t.Log("vtpm-guest --once: registered, pending until the boot is the policy")
	if out, errs, code := guest(once...); code != 0 || !strings.Contains(out, "instance "+id+" registered") || !strings.Contains(out, "verdict pending") {
		t.Fatalf("first run: exit %d\n%s%s", code, out, errs)
	}
	if _, err := u.d.AttestHost(ctx); err != nil {
		t.Fatal(err)
	}
	if h, err := u.c.SetPolicy(ctx, client.Host("test-host"), api.PolicyRequest{Learn: true}); err != nil || h.Verdict != "trusted" {
		t.Fatalf("the host's policy: %+v %v", h, err)
	}
	if a, err := u.c.SetPolicy(ctx, client.Instance(id), api.PolicyRequest{Learn: true}); err != nil || a.Overall != "trusted" {
		t.Fatalf("the instance's policy: %+v %v", a, err)
	}
	if out, errs, code := guest(once...); code != 0 || !strings.Contains(out, "verdict trusted") {
		t.Fatalf("second run: exit %d\n%s%s", code, out, errs)
	}

	key := make([]byte, 32)
	rand.Read(key)
	p1 := client.New(u.d.OperatorURL, "p1")
	if _, err := p1.CreateBrokerSecret(ctx, api.CreateBrokerSecretRequest{Name: "disk", Payload: key, ReleaseTo: []string{id}}); err != nil {
		t.Fatal(err)
	}
	t.Log("vtpm-guest secret get: to standard output, and to a file")
	if out, errs, code := guest("secret", "get", "disk"); code != 0 || out != string(key) {
		t.Fatalf("secret get to standard output: exit %d, %d bytes (want the secret's %d)\n%s", code, len(out), len(key), errs)
	}
	file := filepath.Join(state, "disk.key")
	if _, errs, code := guest("secret", "get", "disk", "--out", file); code != 0 {
		t.Fatalf("secret get --out: exit %d\n%s", code, errs)
	}
	if got, err := os.ReadFile(file); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("the file secret get wrote: %d bytes, %v", len(got), err)
	}
	if fi, _ := os.Stat(file); fi.Mode().Perm() != 0o600 {
		t.Errorf("the secret's file is %v, want 0600", fi.Mode().Perm())
	}

	t.Log("vtpm-guest watch --on-revoke: the host turns untrusted, the action runs, the file goes")
	watch := exec.Command(bin, append([]string{"watch", "--on-revoke", "echo ACTION $VTPM_SECRET", "--event-log", logPath, "--ima-log", "", "--interval", "1h"}, common...)...)
	stdout, err := watch.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var watchErr bytes.Buffer
	watch.Stderr = &watchErr
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { watch.Process.Kill(); watch.Wait() })
	lines := make(chan string, 64)
	go func() {
		defer close(lines)
		for s := bufio.NewScanner(stdout); s.Scan(); {
			lines <- s.Text()
		}
	}()
	waitLine := func(want string) []string {
		t.Helper()
		var seen []string
		deadline := time.After(time.Minute)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("vtpm-guest watch ended before %q: %q\n%s", want, seen, watchErr.String())
				}
				if seen = append(seen, l); strings.Contains(l, want) {
					return seen
				}
			case <-deadline:
				t.Fatalf("vtpm-guest watch: no %q in a minute: %q\n%s", want, seen, watchErr.String())
			}
		}
	}
	waitLine("verdict trusted")
	th.reboot(t, "host kernel 6.1 with a rootkit")
	u.d.AttestHost(ctx) // the reboot broke the agent's connection: it reconnects on the next try
	if h, err := u.d.AttestHost(ctx); err != nil || h.Verdict != "untrusted" {
		t.Fatalf("the host after its reboot: %+v %v", h, err)
	}
	waitLine("secret disk revoked")
	waitLine("ACTION disk")
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("the secret's file after the revocation: %v", err)
	}
	watch.Process.Signal(syscall.SIGTERM)
	if err := watch.Wait(); err != nil {
		t.Errorf("vtpm-guest watch on SIGTERM: %v\n%s", err, watchErr.String())
	}

	t.Log("vtpm-guest secret get, the host untrusted: refused with the reason")
	if out, errs, code := guest("secret", "get", "disk"); code != 1 || out != "" || !strings.Contains(errs, "not trusted") {
		t.Fatalf("secret get after the revocation: exit %d, stdout %d bytes\n%s", code, len(out), errs)
	}
}
