// Package swtpm runs and manufactures swtpm vTPMs, TPM 2.0 and TPM 1.2.
//
// Each vTPM is one `swtpm socket` process serving one state directory, with
// TPM commands on Dir/tpm.sock and the control channel on Dir/tpm.sock.ctrl
// (the names tpm2-tss's swtpm TCTI expects; QEMU attaches to the control
// socket). The command line is, with fds 3-5 inherited:
//
//	swtpm socket [--tpm2] --tpmstate dir=DIR,mode=0600
//	  --server type=unixio,fd=4 --ctrl type=unixio,fd=5
//	  --key pwdfd=3,mode=aes-256-cbc --pid file=DIR/swtpm.pid
//	  --flags not-need-init,startup-clear
//
// The state is encrypted with the instance's secret, which reaches swtpm only
// through the pipe on fd 3, the way libvirt passes it, so a libvirt-run swtpm
// opens the same state; swtpm derives the AES key with PBKDF2 (SHA-512, 1000
// rounds). The secret is never in argv, the environment, a file or a log.
//
// vtpmd binds both sockets itself and hands swtpm the listening fds: the
// sockets exist (mode 0600, owned by swtpm's user) before swtpm runs, a client
// that connects early waits in the backlog instead of polling, and Start
// returns after one round trip on each socket.
//
// not-need-init,startup-clear make swtpm initialise the TPM and send
// TPM2_Startup(CLEAR) (TPM_Startup(ST_CLEAR) for 1.2) itself, so a direct
// client (go-tpm, tpm2-tools with TPM2TOOLS_TCTI=swtpm:path=Dir/tpm.sock) can
// use it at once. QEMU resets the TPM with CMD_INIT anyway and its firmware
// sends its own Startup, so a guest boots as with libvirt. That reset is not
// an orderly shutdown, but TPM 2.0 only counts one against dictionary-attack
// protection when a DA-protected authorisation was used since the Startup,
// which no one does between swtpm's start and QEMU's reset (checked with
// TPM_PT_LOCKOUT_COUNTER in the tests). Process.Stop sends TPM2_Shutdown
// before ending swtpm when no guest holds the data channel (a guest's OS
// sends its own at power-off), so the next boot is orderly.
//
// swtpm runs in its own process group with a parent-death signal (SIGKILL),
// so it cannot outlive vtpmd, and records its pid in Dir/swtpm.pid so that a
// restarted vtpmd finds processes a crash left behind (Stale).
//
// TPM 1.2: Manufacture creates the EK and writes its certificate into NV
// index 0x1000f000 with the TCG header, as swtpm_setup --createek
// --create-ek-cert --lock-nvram does. After the NV lock only the TPM owner
// can read that index; vtpmd takes no ownership, so the certificate is
// readable in the TPM once the guest's owner took ownership (and always
// through vtpmd's API, from Identity). libtpms takes 0.15-0.3 s to
// initialise a TPM 1.2 (at every start, whatever the flags), and its EK is
// a random RSA key, not derived from a seed: a 1.2 vTPM costs about 0.35 s
// to manufacture and 0.2 s to start, against 0.05 s and 0.013 s for 2.0.
package swtpm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/vtpmd/vtpmd/internal/spec"
)

// Instance describes one vTPM's swtpm.
type Instance struct {
	// Dir is the state directory, created 0700 if missing; the pid file
	// and, by default, the sockets live in it. It must not contain a comma
	// (swtpm's option separator).
	Dir string
	// Socket is the data socket's path; "" is Dir/tpm.sock. The control
	// socket is Socket+".ctrl". vtpmd binds both; swtpm inherits them.
	Socket string
	// SocketGroup may connect to the sockets (mode 0660, owned by that
	// group), e.g. the group QEMU runs as; "" leaves them to swtpm's user
	// (0600). The group must also be let through the sockets' directory.
	SocketGroup string
	// Version is spec.V20 or spec.V12.
	Version spec.Version
	// Secret is the state-encryption passphrase (base64 text of 384 random
	// bytes in vtpmd); required, at most 4 KiB.
	Secret []byte
	// User and Group run swtpm when set (vtpmd must then be root); swtpm
	// gets no supplementary groups. Empty: vtpmd's own user and group.
	User, Group string
	// Binary is the swtpm executable; "" is "swtpm" from PATH.
	Binary string
	// Keep lets swtpm outlive vtpmd: no parent-death signal, and its output
	// goes to Dir/swtpm.log rather than to vtpmd. A guest connected to it
	// keeps its TPM while vtpmd restarts, and Adopt takes it back.
	Keep bool
	// Incoming says the state arrives by live migration: Start runs swtpm
	// on a directory with no state yet, where it makes a blank TPM that
	// the guest's incoming QEMU replaces with the state it brings (QEMU
	// stops the TPM and sets its state blobs) before the guest runs.
	Incoming bool
}

// String describes i without its secret, so that printing or logging an
// Instance never leaks it.
func (i Instance) String() string {
	return fmt.Sprintf("swtpm %s in %s", i.Version, i.Dir)
}

// GoString is String, for %#v.
func (i Instance) GoString() string { return i.String() }

// LogValue keeps the secret out of structured logs.
func (i Instance) LogValue() slog.Value {
	return slog.GroupValue(slog.String("dir", i.Dir), slog.String("version", string(i.Version)),
		slog.String("user", i.User), slog.String("group", i.Group))
}

// DataSocket is where TPM commands go (Socket, or Dir/tpm.sock).
func (i Instance) DataSocket() string {
	if i.Socket != "" {
		return i.Socket
	}
	return filepath.Join(i.Dir, "tpm.sock")
}

// CtrlSocket is swtpm's control channel (DataSocket+".ctrl"), QEMU's chardev.
func (i Instance) CtrlSocket() string { return i.DataSocket() + ".ctrl" }

// PIDFile is where swtpm records its pid (Dir/swtpm.pid).
func (i Instance) PIDFile() string { return filepath.Join(i.Dir, "swtpm.pid") }

// logFile is where a kept swtpm writes its output (Dir/swtpm.log).
func (i Instance) logFile() string { return filepath.Join(i.Dir, "swtpm.log") }

// State files of swtpm (swtpm's "dir" backend).
const (
	permallV20 = "tpm2-00.permall"
	permallV12 = "tpm-00.permall"
)

// maxSecret bounds the secret so that writing it into the pipe before
// swtpm reads cannot block (a pipe buffers at least 4 KiB).
const maxSecret = 4096

// fds swtpm inherits (ExtraFiles start at 3).
const (
	fdSecret = 3
	fdData   = 4
	fdCtrl   = 5
)

// args is swtpm's command line. See the package comment for why each flag.
func (i Instance) args() []string {
	a := []string{"socket"}
	if i.Version == spec.V20 {
		a = append(a, "--tpm2")
	}
	return append(a,
		"--tpmstate", "dir="+i.Dir+",mode=0600",
		"--server", fmt.Sprintf("type=unixio,fd=%d", fdData),
		"--ctrl", fmt.Sprintf("type=unixio,fd=%d", fdCtrl),
		"--key", fmt.Sprintf("pwdfd=%d,mode=aes-256-cbc", fdSecret),
		"--pid", "file="+i.PIDFile(),
		"--flags", "not-need-init,startup-clear",
	)
}

// check validates i and makes Dir absolute.
func (i Instance) check() (Instance, error) {
	if i.Version != spec.V20 && i.Version != spec.V12 {
		return i, fmt.Errorf("unsupported TPM version %q", i.Version)
	}
	if len(i.Secret) == 0 {
		return i, ErrNoSecret
	}
	if len(i.Secret) > maxSecret {
		return i, fmt.Errorf("secret longer than %d bytes", maxSecret)
	}
	if i.Dir == "" {
		return i, errors.New("no state directory")
	}
	dir, err := filepath.Abs(i.Dir)
	if err != nil {
		return i, fmt.Errorf("state directory: %w", err)
	}
	if strings.ContainsAny(dir, ",\x00") {
		return i, fmt.Errorf("state directory %q contains a comma", dir)
	}
	i.Dir = dir
	return i, nil
}

func (i Instance) permall() string {
	if i.Version == spec.V12 {
		return filepath.Join(i.Dir, permallV12)
	}
	return filepath.Join(i.Dir, permallV20)
}

// hasState reports whether Dir holds a TPM state of either version.
func hasState(dir string) (bool, error) {
	for _, f := range []string{permallV20, permallV12} {
		_, err := os.Stat(filepath.Join(dir, f))
		if err == nil {
			return true, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return false, fmt.Errorf("looking for TPM state: %w", err)
		}
	}
	return false, nil
}

// Start runs swtpm on the manufactured state in i.Dir and returns once both
// sockets answer: the control channel to CMD_GET_CAPABILITY and the data
// socket to a TPM GetCapability command. It fails with ErrWrongSecret when
// the secret does not decrypt the state (which is then left untouched), with
// ErrNotManufactured when there is no state (unless i.Incoming), and with
// ErrBusy when another
// swtpm serves the directory. ctx bounds the start only, not the process.
func Start(ctx context.Context, i Instance, log *slog.Logger) (*Process, error) {
	i, err := i.check()
	if err != nil {
		return nil, fmt.Errorf("starting swtpm: %w", err)
	}
	if _, err := os.Stat(i.permall()); err != nil && !i.Incoming {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("starting swtpm in %s: %w", i.Dir, ErrNotManufactured)
		}
		return nil, fmt.Errorf("starting swtpm in %s: %w", i.Dir, err)
	}
	p, err := launch(ctx, i, log)
	if err != nil {
		return nil, fmt.Errorf("starting swtpm in %s: %w", i.Dir, err)
	}
	return p, nil
}
