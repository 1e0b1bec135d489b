package swtpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/ctrl"
)

// Process is a running swtpm.
type Process struct {
	inst Instance
	pid  int
	log  *slog.Logger
	out  *output

	done chan struct{}
	err  error // set before done is closed

	stopMu sync.Mutex
}

// Pid is swtpm's process id (also its process group id).
func (p *Process) Pid() int { return p.pid }

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is how the process ended (nil after a clean shutdown); valid once
// Done is closed.
func (p *Process) Err() error {
	select {
	case <-p.done:
		return p.err
	default:
		return nil
	}
}

// Instance is what p serves.
func (p *Process) Instance() Instance { return p.inst }

func (p *Process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends sig to swtpm's process group while it runs.
func (p *Process) kill(sig syscall.Signal) {
	if !p.exited() {
		syscall.Kill(-p.pid, sig)
	}
}

// gracePeriod bounds each polite step of Stop, so that a swtpm whose
// channels a guest holds still gets SIGTERM in time.
const gracePeriod = 250 * time.Millisecond

// Stop ends swtpm gracefully and waits for it to exit: it sends the TPM an
// orderly shutdown (TPM2_Shutdown(STATE) or TPM_SaveState) so that the next
// start is orderly, then CMD_SHUTDOWN on the control channel. swtpm serves
// one client per channel, so while QEMU holds them those requests wait; after
// gracePeriod each, Stop sends SIGTERM, on which swtpm also saves and exits.
// If ctx ends first, swtpm is killed (SIGKILL) and the error wraps ctx's.
// Stopping an exited process returns nil.
func (p *Process) Stop(ctx context.Context) error {
	p.stopMu.Lock()
	defer p.stopMu.Unlock()
	if p.exited() {
		return nil
	}
	polite, cancel := context.WithTimeout(ctx, gracePeriod)
	orderlyShutdown(polite, p.inst)
	cancel()
	polite, cancel = context.WithTimeout(ctx, gracePeriod)
	err := shutdown(polite, p.inst)
	cancel()
	if err == nil {
		select {
		case <-p.done:
			return nil
		case <-time.After(gracePeriod):
		case <-ctx.Done():
		}
	}
	if ctx.Err() == nil {
		p.log.Debug("swtpm did not take CMD_SHUTDOWN; sending SIGTERM", "dir", p.inst.Dir, "pid", p.pid, "err", err)
		p.kill(syscall.SIGTERM)
	}
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		p.kill(syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("swtpm %d did not stop, killed: %w", p.pid, ctx.Err())
	}
}

// discard ends swtpm at once (SIGKILL) and waits for it to exit: for one
// serving a scratch copy of a state, which is thrown away, so it has
// nothing to save.
func (p *Process) discard() {
	p.kill(syscall.SIGKILL)
	<-p.done
}

// shutdown sends CMD_SHUTDOWN, which makes swtpm exit.
func shutdown(ctx context.Context, i Instance) error {
	c, err := ctrl.Dial(ctx, i.CtrlSocket())
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Shutdown(ctx)
}

// orderlyShutdown tells the TPM the platform goes down, as an OS does, best
// effort: TPM 2.0 counts a reset without one (after DA-protected use)
// against dictionary-attack protection. TPM_SU_STATE keeps what a resume
// would need; a Startup(CLEAR) after it is still orderly.
func orderlyShutdown(ctx context.Context, i Instance) {
	tpm, err := Dial(ctx, i.DataSocket())
	if err != nil {
		return
	}
	defer tpm.Close()
	if i.Version == spec.V12 {
		tpm.Send(cmd12(ordSaveState, nil))
	} else {
		// TPM2_Shutdown(TPM_SU_STATE): tag, size, command code, type.
		tpm.Send([]byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x45, 0, 1})
	}
}

// launch runs swtpm on i (already checked) and waits until it serves.
func launch(ctx context.Context, i Instance, log *slog.Logger) (*Process, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if pid, err := Stale(i); err != nil {
		return nil, err
	} else if pid != 0 {
		return nil, fmt.Errorf("%w (pid %d)", ErrBusy, pid)
	}
	cred, err := credential(i)
	if err != nil {
		return nil, err
	}
	if err := prepareDir(i.Dir, cred); err != nil {
		return nil, err
	}
	owner, err := socketOwnerOf(i, cred)
	if err != nil {
		return nil, err
	}
	data, err := listen(i.DataSocket(), owner)
	if err != nil {
		return nil, err
	}
	defer data.Close()
	ctl, err := listen(i.CtrlSocket(), owner)
	if err != nil {
		os.Remove(i.DataSocket())
		return nil, err
	}
	defer ctl.Close()
	secret, err := secretPipe(i.Secret)
	if err != nil {
		return nil, err
	}
	defer secret.Close()

	bin := i.Binary
	if bin == "" {
		bin = "swtpm"
	}
	cmd := exec.Command(bin, i.args()...)
	cmd.Env = []string{} // nothing of vtpmd's environment
	cmd.Dir = "/"
	cmd.ExtraFiles = []*os.File{fdSecret - 3: secret, fdData - 3: data.f, fdCtrl - 3: ctl.f}
	out := newOutput(log.With("dir", i.Dir))
	cmd.Stdout, cmd.Stderr = out, out // swtpm logs errors to stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: cred}
	start := startPinned
	if i.Keep {
		// A pipe to vtpmd would end with vtpmd, and a later write to it
		// would kill swtpm (SIGPIPE): its output goes to a file instead.
		f, err := os.OpenFile(i.logFile(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return nil, fmt.Errorf("swtpm log: %w", err)
		}
		defer f.Close()
		if fi, err := f.Stat(); err == nil {
			out.from = fi.Size()
		}
		cmd.Stdout, cmd.Stderr = f, f
		start = (*exec.Cmd).Start
	} else {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}

	p := &Process{inst: i, log: log, out: out, done: make(chan struct{})}
	if err := start(cmd); err != nil {
		os.Remove(i.DataSocket())
		os.Remove(i.CtrlSocket())
		return nil, fmt.Errorf("running %s: %w", bin, err)
	}
	go func() {
		awaitExit(cmd.Process.Pid)
		err := cmd.Wait()
		removeIfSame(i.DataSocket(), data.info)
		removeIfSame(i.CtrlSocket(), ctl.info)
		removePIDFile(i.PIDFile(), cmd.Process.Pid)
		p.err = err
		close(p.done)
	}()
	p.pid = cmd.Process.Pid
	// Only swtpm may hold the listening sockets now: when it dies, clients
	// see the connection refused or reset instead of waiting forever.
	data.Close()
	ctl.Close()
	secret.Close()

	if err := p.waitReady(ctx); err != nil {
		p.kill(syscall.SIGKILL)
		<-p.done
		return nil, p.startError(err)
	}
	log.Debug("swtpm started", "dir", i.Dir, "pid", p.pid, "version", i.Version)
	return p, nil
}

// spawns carries starts to the spawner thread.
var (
	spawnOnce sync.Once
	spawns    chan spawn
)

type spawn struct {
	cmd  *exec.Cmd
	done chan error
}

// startPinned starts cmd from one OS thread that lives as long as vtpmd.
// The parent-death signal fires when the thread that forked a child ends,
// not when the process does, and Go may end idle threads; forking every
// swtpm from a thread locked for good makes them all die with vtpmd and
// never before, at the cost of one thread rather than one per vTPM.
func startPinned(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawns = make(chan spawn)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread is kept until exit
			for s := range spawns {
				s.done <- s.cmd.Start()
			}
		}()
	})
	done := make(chan error, 1)
	spawns <- spawn{cmd, done}
	return <-done
}

// awaitExit returns once process pid (a child not yet waited for, or an
// adopted swtpm) has exited, without holding an OS thread meanwhile: a
// goroutine blocked in wait4 pins one thread per vTPM, while a pidfd waits
// in the runtime's poller. If pidfds are unavailable it returns at once, and the caller's
// blocking Wait does the waiting.
func awaitExit(pid int) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	// A pidfd turns readable when the process exits; Read waits for that
	// in the poller each time the function reports "not done".
	polled := false
	rc.Read(func(uintptr) bool {
		done := polled
		polled = true
		return done
	})
}

// waitReady returns once both channels answered, or swtpm exited, or ctx
// ended.
func (p *Process) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ready := make(chan error, 1)
	go func() { ready <- probe(ctx, p.inst) }()
	select {
	case err := <-ready:
		if err == nil {
			return nil
		}
		// A probe fails at once when swtpm dies; give it a moment to be
		// reaped so that the error can say why.
		select {
		case <-p.done:
			return ErrExited
		case <-time.After(time.Second):
			return err
		}
	case <-p.done:
		return ErrExited
	case <-ctx.Done():
		return ctx.Err()
	}
}

// probe does one round trip on each channel and checks that the TPM is
// not in failure mode (ErrFailureMode).
func probe(ctx context.Context, i Instance) error {
	c, err := ctrl.Dial(ctx, i.CtrlSocket())
	if err != nil {
		return err
	}
	_, err = c.GetCapability(ctx)
	c.Close()
	if err != nil {
		return err
	}
	tpm, err := Dial(ctx, i.DataSocket())
	if err != nil {
		return err
	}
	defer tpm.Close()
	return checkTPM(tpm, i.Version)
}

// checkTPM asks the TPM a question that a TPM in failure mode cannot answer
// normally, valid in any other state and changing nothing, and returns
// ErrFailureMode if it is in failure mode. TPM 2.0: TPM2_GetTestResult,
// which in failure mode answers with testResult TPM_RC_FAILURE (Part 3,
// 10.4; GetCapability is answered in failure mode, so it proves nothing).
// TPM 1.2: TPM_GetRandom, which a failed TPM refuses with
// TPM_FAILEDSELFTEST (Main Part 3, 4.1: only self-test and capability
// commands are served then). Any other answer, also TPM_RC_INITIALIZE
// before a guest's firmware sent Startup, is a TPM that works.
func checkTPM(tpm transport.TPM, v spec.Version) error {
	cmd := []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x7c} // TPM2_GetTestResult
	if v == spec.V12 {
		cmd = cmd12(ordGetRandom, []byte{0, 0, 0, 1})
	}
	rsp, err := tpm.Send(cmd)
	if err != nil {
		return err
	}
	rc := binary.BigEndian.Uint32(rsp[6:10])
	if v == spec.V12 {
		if rc == rcFailedSelfTest12 {
			return fmt.Errorf("%w: TPM_GetRandom answers TPM_FAILEDSELFTEST", ErrFailureMode)
		}
		return nil
	}
	if rc == rcFailure20 {
		return fmt.Errorf("%w: TPM2_GetTestResult answers TPM_RC_FAILURE", ErrFailureMode)
	}
	if rc != 0 {
		return nil
	}
	// TPM2B_MAX_BUFFER outData, then TPM_RC testResult.
	if len(rsp) < 12 {
		return errors.New("short TPM2_GetTestResult response")
	}
	n := 12 + int(binary.BigEndian.Uint16(rsp[10:12]))
	if len(rsp) < n+4 {
		return errors.New("short TPM2_GetTestResult response")
	}
	if binary.BigEndian.Uint32(rsp[n:n+4]) == rcFailure20 {
		return fmt.Errorf("%w: TPM2_GetTestResult gives testResult TPM_RC_FAILURE", ErrFailureMode)
	}
	return nil
}

// Response codes of a TPM in failure mode.
const (
	rcFailure20        = 0x101 // TPM_RC_FAILURE
	rcFailedSelfTest12 = 0x1c  // TPM_FAILEDSELFTEST
)

// Check reports whether p's TPM works: ErrExited once swtpm is gone;
// ErrFailureMode when swtpm said it entered failure mode or, with probe,
// when a round trip on the data channel finds it so. The caller probes only
// while no client holds either channel (ConnectedSockets): swtpm serves one
// client per channel, and a probe would wait behind a guest. A probe that
// gets no answer in time proves nothing and is not an error here.
func (p *Process) Check(ctx context.Context, probe bool) error {
	if p.exited() {
		return ErrExited
	}
	if p.inst.Keep {
		p.readKeptLog()
	}
	if p.out.failed() {
		return fmt.Errorf("%w: swtpm reported it", ErrFailureMode)
	}
	if !probe {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	tpm, err := Dial(ctx, p.inst.DataSocket())
	if err != nil {
		return nil
	}
	defer tpm.Close()
	if err := checkTPM(tpm, p.inst.Version); errors.Is(err, ErrFailureMode) {
		return err
	}
	return nil
}

// checkTimeout bounds Check's probe; swtpm answers in a millisecond.
const checkTimeout = 2 * time.Second

// readKeptLog feeds what a kept swtpm wrote to its log file since the last
// read to the output classifier.
func (p *Process) readKeptLog() {
	f, err := os.Open(p.inst.logFile())
	if err != nil {
		return
	}
	defer f.Close()
	p.out.mu.Lock()
	from := p.out.from
	p.out.mu.Unlock()
	fi, err := f.Stat()
	if err != nil || fi.Size() <= from {
		return
	}
	b := make([]byte, min(fi.Size()-from, 1<<20))
	n, _ := f.ReadAt(b, from)
	p.out.mu.Lock()
	p.out.from = from + int64(n)
	p.out.mu.Unlock()
	p.out.Write(b[:n])
}

// startError explains a start that failed with err, from swtpm's output.
func (p *Process) startError(err error) error {
	if p.inst.Keep {
		if b, rerr := os.ReadFile(p.inst.logFile()); rerr == nil && int64(len(b)) >= p.out.from {
			p.out.Write(b[p.out.from:])
		}
	}
	if known := p.out.classify(); known != nil {
		return known
	}
	if errors.Is(err, ErrExited) && p.err != nil {
		err = fmt.Errorf("%w (%v)", err, p.err)
	}
	if msg := lastLines(p.out.String(), 4); msg != "" {
		return fmt.Errorf("%w: %s", err, msg)
	}
	return err
}

// secretPipe returns the read end of a pipe that holds secret and then
// EOF. swtpm reads the passphrase until a short read.
func secretPipe(secret []byte) (*os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("secret pipe: %w", err)
	}
	_, err = w.Write(secret)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("secret pipe: %w", err)
	}
	return r, nil
}

// listener is a listening unix socket for swtpm to inherit.
type listener struct {
	f    *os.File
	info fs.FileInfo // the socket file, to remove only our own later
}

func (l listener) Close() { l.f.Close() }

// socketOwner is who owns swtpm's sockets: swtpm's user (nil: vtpmd's),
// and with SocketGroup that group, which may connect too.
type socketOwner struct {
	uid, gid int // -1: unchanged
	mode     os.FileMode
}

func socketOwnerOf(i Instance, cred *syscall.Credential) (socketOwner, error) {
	o := socketOwner{uid: -1, gid: -1, mode: 0o600}
	if cred != nil {
		o.uid, o.gid = int(cred.Uid), int(cred.Gid)
	}
	if i.SocketGroup != "" {
		gid, err := GroupID(i.SocketGroup)
		if err != nil {
			return o, fmt.Errorf("socket group: %w", err)
		}
		o.gid, o.mode = gid, 0o660
	}
	return o, nil
}

// listen binds a unix socket at path, with o's mode and owner, replacing a
// stale socket file but never one something still listens on.
func listen(path string, o socketOwner) (listener, error) {
	if len(path) >= len(syscall.RawSockaddrUnix{}.Path) {
		return listener{}, fmt.Errorf("socket path %s is too long for a unix socket", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return listener{}, fmt.Errorf("%w: %s answers", ErrBusy, path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return listener{}, fmt.Errorf("removing stale socket: %w", err)
	}
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return listener{}, fmt.Errorf("socket: %w", err)
	}
	f := os.NewFile(uintptr(fd), path)
	fail := func(what string, err error) (listener, error) {
		f.Close()
		os.Remove(path)
		return listener{}, fmt.Errorf("%s %s: %w", what, path, err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		return fail("binding", err)
	}
	if err := os.Chmod(path, o.mode); err != nil {
		return fail("chmod", err)
	}
	if o.uid != -1 || o.gid != -1 {
		if err := os.Lchown(path, o.uid, o.gid); err != nil {
			return fail("chown", err)
		}
	}
	if err := syscall.Listen(fd, 16); err != nil {
		return fail("listening on", err)
	}
	info, err := os.Lstat(path)
	if err != nil {
		return fail("stat", err)
	}
	return listener{f: f, info: info}, nil
}

// removeIfSame removes path if it is still the file info describes, so that
// an exiting swtpm never removes the socket of its successor.
func removeIfSame(path string, info fs.FileInfo) {
	if now, err := os.Lstat(path); err == nil && os.SameFile(now, info) {
		os.Remove(path)
	}
}

// removePIDFile removes swtpm's pid file if it names pid (swtpm leaves it).
func removePIDFile(path string, pid int) {
	if b, err := os.ReadFile(path); err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(pid) {
		os.Remove(path)
	}
}

// Own makes i's state directory what a start of swtpm makes it: 0700,
// owned with all it holds by the user swtpm runs as (i.User and i.Group),
// for a state written by vtpmd rather than by swtpm (an imported one).
func Own(i Instance) error {
	cred, err := credential(i)
	if err != nil {
		return err
	}
	return prepareDir(i.Dir, cred)
}

// prepareDir makes dir 0700, owned by cred's user (with its contents) when
// swtpm runs as another user.
func prepareDir(dir string, cred *syscall.Credential) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating state dir: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	if cred == nil {
		return nil
	}
	return filepath.WalkDir(dir, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := os.Lchown(path, int(cred.Uid), int(cred.Gid)); err != nil {
			return fmt.Errorf("state dir: %w", err)
		}
		return nil
	})
}

// GroupID is the numeric id of the group called name.
func GroupID(name string) (int, error) {
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(g.Gid)
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
		var err error
		if gid, err = GroupID(i.Group); err != nil {
			return nil, fmt.Errorf("swtpm group: %w", err)
		}
	}
	if uid == os.Getuid() && gid == os.Getgid() {
		return nil, nil
	}
	// An empty Groups drops vtpmd's supplementary groups (root's included).
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, nil
}

// output collects swtpm's log lines: each goes to the logger at debug level,
// the last few are kept to explain a failed start, and the lines that
// classify a failure are remembered however early they came.
type output struct {
	log  *slog.Logger
	from int64 // with Instance.Keep: where this start's lines begin in the log file

	mu         sync.Mutex
	partial    []byte
	lines      []string
	wrongKey   bool
	lockFailed bool
	failure    bool // swtpm reported failure mode
}

const keptLines = 16

// Lines by which swtpm 0.7 reports the failures Start classifies. swtpm
// checks the state's HMAC, keyed by the secret, before it decrypts or
// writes anything; the lock is on Dir/.lock.
const (
	markWrongKey   = "Verification of HMAC failed"
	markLockFailed = "Could not lock access to lockfile"
)

// Lines by which swtpm 0.7 and libtpms 0.9 report failure mode: libtpms's
// own for TPM 2.0, and swtpm's failed state write, after which a TPM 1.2
// fails every command too.
var markFailure = []string{"Entering failure mode", "SWTPM_NVRAM_StoreData: Error (fatal)"}

func newOutput(log *slog.Logger) *output { return &output{log: log} }

func (o *output) Write(b []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.partial = append(o.partial, b...)
	for {
		n := bytes.IndexByte(o.partial, '\n')
		if n < 0 {
			break
		}
		line := strings.TrimSpace(string(o.partial[:n]))
		o.partial = o.partial[n+1:]
		if line == "" {
			continue
		}
		o.log.Debug("swtpm output", "line", line)
		o.wrongKey = o.wrongKey || strings.Contains(line, markWrongKey)
		o.lockFailed = o.lockFailed || strings.Contains(line, markLockFailed)
		o.failure = o.failure || slices.ContainsFunc(markFailure, func(m string) bool { return strings.Contains(line, m) })
		o.lines = append(o.lines, line)
		if len(o.lines) > keptLines {
			o.lines = o.lines[1:]
		}
	}
	if len(o.partial) > 4096 { // a runaway line
		o.partial = o.partial[:0]
	}
	return len(b), nil
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return strings.Join(append(o.lines, string(o.partial)), "\n")
}

func (o *output) failed() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.failure
}

func (o *output) classify() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	switch {
	case o.wrongKey:
		return ErrWrongSecret
	case o.lockFailed:
		return ErrBusy
	case o.failure:
		return ErrFailureMode
	}
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.TrimSpace(strings.Join(lines, "; "))
}
