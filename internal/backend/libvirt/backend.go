// Package libvirt is the backend for QEMU/KVM guests under libvirtd. A vTPM
// is attached to a libvirt domain in one of two modes:
//
//   - emulator, what Nova does: libvirt runs swtpm itself, keyed by a libvirt
//     secret whose UUID is the key-manager secret's. vtpmd manufactures the
//     state beforehand in libvirt's state directory, encrypted as libvirt's
//     swtpm reads it, so the EK certificates come from the deployment CA
//     and libvirt never runs swtpm_setup. libvirt keeps TPM state by domain
//     UUID, so the domain's UUID must be the instance id, as under Nova.
//   - external: vtpmd runs and supervises swtpm (the host's swtpm runtime,
//     swtpmhost) and the domain connects to its control socket; the vTPM
//     outlives the guest.
//
// In either mode a vTPM's state leaves its host and comes back (cold
// migration, shelve, backups) as the swtpm backend's does, through the
// swtpm runtime, with what the mode needs around it made on arrival
// (transfer.go).
//
// libvirtd is reached over its unix socket with go-libvirt (no cgo); XML is
// built and edited with libvirtxml.
package libvirt

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"sync"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
)

// DefaultSocket is libvirtd's socket.
const DefaultSocket = "/var/run/libvirt/libvirt-sock"

// Mode is how a vTPM reaches its guest.
type Mode string

// The modes.
const (
	Emulator Mode = "emulator"
	External Mode = "external"
)

// Config configures the backend. Its operator settings mirror the OpenStack
// charm's: enable-vtpm, swtpm_user, swtpm_group and the secret-security
// modes offered.
type Config struct {
	Mode Mode
	// EnableVTPM is the operator's switch; off, the host offers no TPM
	// traits and the backend refuses to make vTPMs.
	EnableVTPM bool
	// Socket is libvirtd's socket; default /var/run/libvirt/libvirt-sock.
	Socket string
	// MigrationURI is how the other hosts' libvirtd reach this host's, to
	// live-migrate guests here peer-to-peer (qemu+tcp://HOST/system, say);
	// "" for a host that takes no live migrations.
	MigrationURI string
	// StateRoot is where libvirt keeps swtpm state, one directory per domain
	// UUID; default /var/lib/libvirt/swtpm.
	StateRoot string
	// SwtpmUser and SwtpmGroup are what libvirt's qemu.conf runs swtpm as
	// (and what vtpmd's own swtpm runs as in external mode).
	SwtpmUser, SwtpmGroup string
	// SecretSecurity are the modes this host offers; nil means all.
	SecretSecurity []spec.SecretSecurity
	// Swtpm, the host's swtpm runtime, runs the vTPMs of external mode and
	// manufactures those of emulator mode.
	Swtpm *swtpmhost.Runtime
	// KVMDevice is the KVM device whose access New checks; default
	// /dev/kvm.
	KVMDevice string
	Log       *slog.Logger
}

// Backend attaches vTPMs to libvirt domains.
type Backend struct {
	cfg Config
	log *slog.Logger

	mu      sync.Mutex
	lv      *golibvirt.Libvirt
	serving map[string]int // external mode: instance → pid of the swtpm seen serving its running guest
}

var _ agent.Backend = (*Backend)(nil)

// New checks the configuration and connects to libvirtd. With vTPM enabled
// it refuses to start when libvirt cannot provide a vTPM in the chosen mode
// or the swtpm user or group does not exist, saying which. It warns (and
// starts) when libvirt's QEMU user cannot open the host's KVM device.
func New(ctx context.Context, cfg Config) (*Backend, error) {
	if cfg.StateRoot == "" {
		cfg.StateRoot = "/var/lib/libvirt/swtpm"
	}
	if cfg.Mode != Emulator && cfg.Mode != External {
		return nil, fmt.Errorf("libvirt mode %q: want %s or %s", cfg.Mode, Emulator, External)
	}
	if cfg.Swtpm == nil {
		return nil, errors.New("the libvirt backend needs the host's swtpm runtime to manufacture vTPMs")
	}
	if cfg.KVMDevice == "" {
		cfg.KVMDevice = KVMDevice
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	b := &Backend{cfg: cfg, log: cfg.Log, serving: map[string]int{}}
	lv, err := b.conn()
	if err != nil {
		return nil, err
	}
	b.warnKVM(lv)
	if !cfg.EnableVTPM {
		return b, nil
	}
	if cfg.SwtpmUser != "" {
		if _, err := user.Lookup(cfg.SwtpmUser); err != nil {
			return nil, fmt.Errorf("vTPM is enabled but the swtpm user %q does not exist: %w", cfg.SwtpmUser, err)
		}
	}
	if cfg.SwtpmGroup != "" {
		if _, err := user.LookupGroup(cfg.SwtpmGroup); err != nil {
			return nil, fmt.Errorf("vTPM is enabled but the swtpm group %q does not exist: %w", cfg.SwtpmGroup, err)
		}
	}
	if _, err := b.Capabilities(ctx); err != nil {
		return nil, err
	}
	return b, nil
}

// warnKVM logs a warning when the host has a KVM device that libvirt's QEMU
// user cannot open: libvirt then probes QEMU again on every call (see
// kvmProblem).
func (b *Backend) warnKVM(lv *golibvirt.Libvirt) {
	if _, err := os.Stat(b.cfg.KVMDevice); err != nil {
		return // no KVM: nothing to check, and no call to make
	}
	xml, err := lv.ConnectGetCapabilities()
	if err != nil {
		b.log.Warn("cannot check whether QEMU may use KVM", "device", b.cfg.KVMDevice, "err", err)
		return
	}
	p, err := checkKVM(xml, b.cfg.KVMDevice)
	if err != nil {
		b.log.Warn("cannot check whether QEMU may use KVM", "device", b.cfg.KVMDevice, "err", err)
		return
	}
	if p != nil {
		b.log.Warn("libvirt runs QEMU as a user who cannot open the KVM device: libvirt finds its cached QEMU capabilities stale and probes QEMU again on every call (seconds each), so every vTPM operation is slow",
			"user", p.User, "device", p.Device, "device_group", p.DeviceGroup, "fix", p.Fix)
	}
}

// conn returns the libvirtd connection, dialling again after libvirtd
// restarted.
func (b *Backend) conn() (*golibvirt.Libvirt, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.lv != nil && b.lv.IsConnected() {
		return b.lv, nil
	}
	lv, err := dial(b.cfg.Socket)
	if err != nil {
		return nil, err
	}
	b.lv = lv
	return lv, nil
}

func dial(socket string) (*golibvirt.Libvirt, error) {
	if socket == "" {
		socket = DefaultSocket
	}
	lv := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket), dialers.WithLocalTimeout(5*time.Second)))
	if err := lv.ConnectToURI(golibvirt.QEMUSystem); err != nil {
		return nil, fmt.Errorf("connecting to libvirtd at %s: %w", socket, err)
	}
	return lv, nil
}

// Close disconnects from libvirtd; vTPMs and guests keep running.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.lv == nil {
		return nil
	}
	return b.lv.Disconnect()
}

// Name implements agent.Backend.
func (b *Backend) Name() string { return "libvirt" }

// Sockets implements agent.Backend: in external mode, vtpmd's swtpm; in
// emulator mode libvirt's swtpm is QEMU's alone, so none.
func (b *Backend) Sockets(id string) api.Sockets {
	if b.cfg.Mode == External {
		return b.cfg.Swtpm.Sockets(id)
	}
	return api.Sockets{}
}

// PID implements agent.Server: vtpmd's swtpm in external mode; in
// emulator mode libvirt runs swtpm, and it is not vtpmd's to report.
func (b *Backend) PID(id string) int {
	if b.cfg.Mode == External {
		return b.cfg.Swtpm.Running(id)
	}
	return 0
}

// Connected implements agent.Server: whether the guest's QEMU holds
// vtpmd's swtpm in external mode; in emulator mode, not vtpmd's to tell.
func (b *Backend) Connected(id string) bool {
	return b.cfg.Mode == External && b.cfg.Swtpm.Connected(id)
}

// stateDir is where libvirt keeps the swtpm state of domain uuid.
func (b *Backend) stateDir(uuid string) string { return filepath.Join(b.cfg.StateRoot, uuid) }

// tpmDir is the directory under stateDir that holds a TPM of version v.
func tpmDir(v spec.Version) string {
	if v == spec.V12 {
		return "tpm1.2"
	}
	return "tpm2"
}

// exists reports whether path exists.
func exists(path string) (bool, error) {
	_, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}
