// Package swtpm runs and manufactures swtpm vTPMs.
//
// Each vTPM is one `swtpm socket` process serving one state directory, with
// TPM commands on <dir>/tpm.sock and the control channel on
// <dir>/tpm.sock.ctrl (the names tpm2-tss's swtpm TCTI expects). The state is
// encrypted with a per-vTPM secret that reaches swtpm through an inherited
// pipe (`--key pwdfd=3,mode=aes-256-cbc`, the way libvirt passes it), never
// through argv, the environment or a file.
package swtpm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/ctrl"
)

// ErrWrongSecret: swtpm could not decrypt the state with the given secret.
// The state is left as it was.
var ErrWrongSecret = errors.New("the vTPM state does not open with this secret")

// Instance describes one vTPM's swtpm.
type Instance struct {
	// Dir is the state directory (created 0700); the sockets live in it.
	Dir     string
	Version spec.Version
	// Secret is the state-encryption passphrase.
	Secret []byte
	// User and Group run swtpm when set (vtpmd must then be root).
	User, Group string
	// Binary is the swtpm executable; "" means swtpm from PATH.
	Binary string
}

// DataSocket is where TPM commands go.
func (i Instance) DataSocket() string { return filepath.Join(i.Dir, "tpm.sock") }

// CtrlSocket is swtpm's control channel (QEMU's chardev).
func (i Instance) CtrlSocket() string { return filepath.Join(i.Dir, "tpm.sock.ctrl") }

// PIDFile is where swtpm records its pid, for finding stale processes.
func (i Instance) PIDFile() string { return filepath.Join(i.Dir, "swtpm.pid") }

func (i Instance) logFile() string { return filepath.Join(i.Dir, "swtpm.log") }

// args is swtpm's command line. The flags not-need-init and startup-clear
// make the TPM usable at once by a plain TPM client (tpm2-tools, go-tpm);
// QEMU sends its own CMD_INIT when a guest boots.
func (i Instance) args() []string {
	a := []string{"socket"}
	if i.Version == spec.V20 {
		a = append(a, "--tpm2")
	}
	return append(a,
		"--tpmstate", "dir="+i.Dir+",mode=0600",
		"--server", "type=unixio,path="+i.DataSocket()+",mode=0600",
		"--ctrl", "type=unixio,path="+i.CtrlSocket()+",mode=0600",
		"--key", "pwdfd=3,mode=aes-256-cbc",
		"--pid", "file="+i.PIDFile(),
		"--log", "file="+i.logFile()+",level=1",
		"--flags", "not-need-init,startup-clear",
	)
}

// Process is a running swtpm.
type Process struct {
	inst Instance
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// Pid is swtpm's process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is how the process ended; valid after Done.
func (p *Process) Err() error { return p.err }

// Start runs swtpm on the state in i.Dir and returns once its control
// channel answers.
func Start(ctx context.Context, i Instance, log *slog.Logger) (*Process, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := prepareDir(i); err != nil {
		return nil, err
	}
	// Remove sockets of a previous run: swtpm refuses to bind over them.
	for _, s := range []string{i.DataSocket(), i.CtrlSocket()} {
		if err := os.Remove(s); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	logStart := fileSize(i.logFile())

	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	// The pipe buffer holds far more than a 512-byte secret, so writing
	// before swtpm reads cannot block.
	if _, err := w.Write(i.Secret); err != nil {
		w.Close()
		return nil, err
	}
	w.Close()

	bin := i.Binary
	if bin == "" {
		bin = "swtpm"
	}
	cmd := exec.Command(bin, i.args()...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.ExtraFiles = []*os.File{r} // fd 3
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL, // never outlive vtpmd
	}
	if cred, err := credential(i); err != nil {
		return nil, err
	} else if cred != nil {
		cmd.SysProcAttr.Credential = cred
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting swtpm: %w", err)
	}
	p := &Process{inst: i, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()

	if err := p.waitReady(ctx); err != nil {
		syscall.Kill(-p.Pid(), syscall.SIGKILL)
		<-p.done
		msg := readFrom(i.logFile(), logStart) + stderr.String()
		if bytes.Contains([]byte(msg), []byte("Verification of HMAC failed")) {
			return nil, fmt.Errorf("starting swtpm in %s: %w", i.Dir, ErrWrongSecret)
		}
		return nil, fmt.Errorf("starting swtpm in %s: %w: %s", i.Dir, err, lastLines(msg, 3))
	}
	log.Debug("swtpm started", "dir", i.Dir, "pid", p.Pid())
	return p, nil
}

// waitReady polls the control channel until it answers, the process dies,
// or ctx ends.
func (p *Process) waitReady(ctx context.Context) error {
	deadline := time.Now().Add(10 * time.Second)
	for delay := time.Millisecond; ; delay = min(delay*2, 20*time.Millisecond) {
		if c, err := ctrl.Dial(p.inst.CtrlSocket()); err == nil {
			_, err = c.GetCapability()
			c.Close()
			if err == nil {
				return nil
			}
		}
		select {
		case <-p.done:
			return fmt.Errorf("swtpm exited: %v", p.err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		if time.Now().After(deadline) {
			return errors.New("swtpm did not answer within 10s")
		}
	}
}

// Stop asks swtpm to save its state and exit, and kills it if ctx ends
// first.
func (p *Process) Stop(ctx context.Context) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	p.orderlyShutdown()
	if c, err := ctrl.Dial(p.inst.CtrlSocket()); err == nil {
		c.Shutdown()
		c.Close()
	}
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		syscall.Kill(-p.Pid(), syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("swtpm %d did not shut down; killed: %w", p.Pid(), ctx.Err())
	}
}

// orderlyShutdown tells the TPM the platform is going down, as a host's OS
// does, so the next start is orderly: TPM 2.0 counts a start without one
// against dictionary-attack protection, and a few such restarts lock out
// every DA-protected key and NV index. Best effort: when a client holds the
// data socket (swtpm serves one at a time) the TPM is left as it is.
func (p *Process) orderlyShutdown() {
	conn, err := net.DialTimeout("unix", p.inst.DataSocket(), 100*time.Millisecond)
	if err != nil {
		return
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if p.inst.Version == spec.V12 {
		conn.Write(cmd12(ordSaveState, nil))
	} else {
		// TPM2_Shutdown(TPM_SU_STATE): tag, size, command code, shutdown type.
		conn.Write([]byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x45, 0, 1})
	}
	conn.Read(make([]byte, 64))
}

// prepareDir creates the state directory 0700, owned by swtpm's user.
func prepareDir(i Instance) error {
	if err := os.MkdirAll(i.Dir, 0o700); err != nil {
		return fmt.Errorf("creating state dir: %w", err)
	}
	if err := os.Chmod(i.Dir, 0o700); err != nil {
		return err
	}
	cred, err := credential(i)
	if err != nil || cred == nil {
		return err
	}
	return filepath.Walk(i.Dir, func(path string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, int(cred.Uid), int(cred.Gid))
	})
}

// credential is the uid/gid to run swtpm as, or nil for vtpmd's own.
func credential(i Instance) (*syscall.Credential, error) {
	if i.User == "" && i.Group == "" {
		return nil, nil
	}
	uid, gid := os.Getuid(), os.Getgid()
	if i.User != "" {
		u, err := user.Lookup(i.User)
		if err != nil {
			return nil, fmt.Errorf("swtpm user: %w", err)
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
	}
	if i.Group != "" {
		g, err := user.LookupGroup(i.Group)
		if err != nil {
			return nil, fmt.Errorf("swtpm group: %w", err)
		}
		gid, _ = strconv.Atoi(g.Gid)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}, nil
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// readFrom returns what was appended to path since offset (at most 64 KiB).
func readFrom(path string, offset int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	f.Seek(offset, io.SeekStart)
	b, _ := io.ReadAll(io.LimitReader(f, 64<<10))
	return string(b)
}

func lastLines(s string, n int) string {
	lines := bytes.Split(bytes.TrimSpace([]byte(s)), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("; ")))
}
