// Package direct is the backend in which vtpmd runs swtpm itself: each vTPM
// is a supervised `swtpm socket` process with its state under
// <root>/<instance>/, reachable at tpm.sock (TPM commands) and tpm.sock.ctrl
// (control channel, for QEMU).
package direct

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// Certifier issues EK certificates; the deployment CA is one.
type Certifier interface {
	CertifyEK(ctx context.Context, instanceID string, v spec.Version, kind swtpm.EKKind, pub crypto.PublicKey) ([]byte, error)
}

// Config configures the backend.
type Config struct {
	// Root holds one directory per vTPM.
	Root string
	// SocketDir holds the vTPMs' sockets (<id>.sock, <id>.sock.ctrl) when
	// clients other than vtpmd's user must reach them, as QEMU must under
	// libvirt; "" keeps each in its vTPM's directory under Root (0700).
	SocketDir string
	// SocketGroup may connect to the sockets (and pass through SocketDir),
	// e.g. the group libvirt runs QEMU as; needs SocketDir.
	SocketGroup string
	// KeepRunning lets swtpm processes outlive vtpmd (swtpm.Instance.Keep):
	// a guest connected to one keeps its TPM while vtpmd restarts. Close
	// leaves them running and the next vtpmd adopts them.
	KeepRunning bool
	// User and Group run swtpm; empty means vtpmd's own.
	User, Group string
	// Binary is the swtpm binary; default "swtpm".
	Binary    string
	Certifier Certifier
	// PCRBanks allocated at manufacture; default sha256.
	PCRBanks []string
	// PoolSize is how many manufactured TPM 2.0s are kept ready for new
	// instances; 0 makes every TPM on demand.
	PoolSize int
	Log      *slog.Logger
}

// Backend runs and supervises swtpm processes.
type Backend struct {
	cfg  Config
	log  *slog.Logger
	mu   sync.Mutex
	runs map[string]*supervisor
	pool *pool // nil without a pool
	// clients is which sockets clients hold, read once for many checks.
	clients clients
}

var _ agent.Backend = (*Backend)(nil)

// New makes a backend; it creates Root (0700) and SocketDir.
func New(cfg Config) (*Backend, error) {
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return nil, fmt.Errorf("creating vTPM root: %w", err)
	}
	if err := prepareSocketDir(cfg.SocketDir, cfg.SocketGroup); err != nil {
		return nil, err
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := &Backend{cfg: cfg, log: log, runs: map[string]*supervisor{}}
	if cfg.PoolSize > 0 {
		if err := b.startPool(cfg.PoolSize); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// Name implements agent.Backend.
func (b *Backend) Name() string { return "swtpm" }

// Capabilities implements agent.Backend: swtpm serves both versions; the
// guest device model is QEMU's business, so both models are offered.
func (b *Backend) Capabilities(ctx context.Context) (spec.Capabilities, error) {
	return spec.Capabilities{
		Enabled:  true,
		Versions: []spec.Version{spec.V12, spec.V20},
		Models:   []spec.Model{spec.TIS, spec.CRB},
	}, nil
}

// Sockets implements agent.Backend.
func (b *Backend) Sockets(id string) api.Sockets {
	i := swtpm.Instance{Dir: b.dir(id), Socket: b.socket(id)}
	return api.Sockets{Data: i.DataSocket(), Ctrl: i.CtrlSocket()}
}

func (b *Backend) dir(id string) string { return filepath.Join(b.cfg.Root, id) }

// socket is vTPM id's data socket, or "" for the default in its directory.
func (b *Backend) socket(id string) string {
	if b.cfg.SocketDir == "" {
		return ""
	}
	return filepath.Join(b.cfg.SocketDir, id+".sock")
}

// prepareSocketDir makes dir 0700, or 0710 with group allowed through:
// members reach the sockets they know the names of, and cannot list them.
func prepareSocketDir(dir, group string) error {
	if dir == "" {
		if group != "" {
			return errors.New("a socket group needs a socket directory: vTPM state directories are private")
		}
		return nil
	}
	mode, gid := os.FileMode(0o700), -1
	if group != "" {
		var err error
		if gid, err = swtpm.GroupID(group); err != nil {
			return fmt.Errorf("socket group: %w", err)
		}
		mode = 0o710
	}
	if err := os.MkdirAll(dir, mode); err != nil {
		return fmt.Errorf("creating the socket directory: %w", err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	if err := os.Chown(dir, -1, gid); err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	return nil
}

// Dir is where vTPM id's state lives.
func (b *Backend) Dir(id string) string { return b.dir(id) }

func (b *Backend) instance(v *store.VTPM, secret []byte) swtpm.Instance {
	return swtpm.Instance{Dir: b.dir(v.InstanceID), Socket: b.socket(v.InstanceID), SocketGroup: b.cfg.SocketGroup,
		Version: v.Spec.Version, Secret: secret, User: b.cfg.User, Group: b.cfg.Group, Binary: b.cfg.Binary, Keep: b.cfg.KeepRunning}
}

// IdentityFile records a manufactured vTPM's public identity next to its
// state. It is written last, so its presence means manufacturing finished.
const IdentityFile = "identity.json"

// Ensure implements agent.Backend.
func (b *Backend) Ensure(ctx context.Context, v *store.VTPM, secret []byte) ([]store.EK, error) {
	inst := b.instance(v, secret)
	eks, err := readIdentity(inst.Dir)
	switch {
	case errors.Is(err, fs.ErrNotExist) && len(v.EKs) > 0:
		// The record says it was manufactured: never wipe a TPM we made.
		return nil, fmt.Errorf("state of %s is missing its identity; refusing to re-manufacture over it", v.InstanceID)
	case errors.Is(err, fs.ErrNotExist):
		if eks, err = b.manufacture(ctx, v, inst); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	}
	return eks, b.start(ctx, v.InstanceID, inst)
}

// manufacture makes a new TPM from scratch and leaves it serving;
// leftovers of an interrupted attempt are wiped first.
func (b *Backend) manufacture(ctx context.Context, v *store.VTPM, inst swtpm.Instance) ([]store.EK, error) {
	b.stopRun(ctx, v.InstanceID)
	eks, proc, err := b.make(ctx, v, inst, true)
	if err != nil {
		return nil, err
	}
	// The manufacturing process goes on serving: no second start.
	b.supervise(v.InstanceID, inst, proc)
	return eks, nil
}

// Manufacture makes v's TPM in dir and stops it, for a TPM that another
// program runs (libvirt's swtpm). A dir that already holds a manufactured
// TPM is kept and its EKs returned; a half-made one is wiped and made again.
func (b *Backend) Manufacture(ctx context.Context, v *store.VTPM, secret []byte, dir string) ([]store.EK, error) {
	if eks, err := readIdentity(dir); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return eks, err
	}
	if len(v.EKs) > 0 {
		return nil, fmt.Errorf("state of %s is missing its identity; refusing to re-manufacture over it", v.InstanceID)
	}
	inst := b.instance(v, secret)
	inst.Dir = dir
	eks, _, err := b.make(ctx, v, inst, false)
	return eks, err
}

// make manufactures inst from an empty directory and records its identity
// next to the state, last, so that the identity file means "finished".
// With serve, the manufacturing swtpm is left running and returned.
func (b *Backend) make(ctx context.Context, v *store.VTPM, inst swtpm.Instance, serve bool) (_ []store.EK, proc *swtpm.Process, err error) {
	if err := os.RemoveAll(inst.Dir); err != nil {
		return nil, nil, fmt.Errorf("clearing half-made state: %w", err)
	}
	start := time.Now()
	opts := swtpm.ManufactureOptions{
		PCRBanks: b.cfg.PCRBanks,
		Log:      b.log,
		Certify: func(ctx context.Context, kind swtpm.EKKind, pub crypto.PublicKey) ([]byte, error) {
			return b.cfg.Certifier.CertifyEK(ctx, v.InstanceID, v.Spec.Version, kind, pub)
		},
	}
	var id *swtpm.Identity
	if serve {
		id, proc, err = swtpm.ManufactureAndStart(ctx, inst, opts)
	} else {
		id, err = swtpm.Manufacture(ctx, inst, opts)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("manufacturing: %w", err)
	}
	defer func() {
		if err != nil && proc != nil {
			proc.Stop(ctx)
		}
	}()
	var eks []store.EK
	for _, ek := range id.EKs {
		der, err := x509.MarshalPKIXPublicKey(ek.Public)
		if err != nil {
			return nil, nil, fmt.Errorf("encoding EK: %w", err)
		}
		eks = append(eks, store.EK{Kind: string(ek.Kind), Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: der, CertDER: ek.CertDER})
	}
	data, err := json.Marshal(eks)
	if err != nil {
		return nil, nil, err
	}
	if err := atomicfile.Write(filepath.Join(inst.Dir, IdentityFile), data, 0o600); err != nil {
		return nil, nil, fmt.Errorf("recording identity: %w", err)
	}
	b.log.Info("manufactured vTPM", "instance", v.InstanceID, "version", v.Spec.Version, "took", time.Since(start))
	return eks, proc, nil
}

func readIdentity(dir string) ([]store.EK, error) {
	data, err := os.ReadFile(filepath.Join(dir, IdentityFile))
	if err != nil {
		return nil, err
	}
	var eks []store.EK
	if err := json.Unmarshal(data, &eks); err != nil {
		return nil, fmt.Errorf("reading identity in %s: %w", dir, err)
	}
	return eks, nil
}

// Stop implements agent.Backend.
func (b *Backend) Stop(ctx context.Context, v *store.VTPM) error {
	return b.stopRun(ctx, v.InstanceID)
}

// Destroy implements agent.Backend.
func (b *Backend) Destroy(ctx context.Context, v *store.VTPM) error {
	if err := b.stopRun(ctx, v.InstanceID); err != nil {
		return err
	}
	if err := os.RemoveAll(b.dir(v.InstanceID)); err != nil {
		return fmt.Errorf("removing state of %s: %w", v.InstanceID, err)
	}
	if s := b.socket(v.InstanceID); s != "" {
		// Left behind only by a swtpm killed with vtpmd; nothing listens.
		os.Remove(s)
		os.Remove(s + ".ctrl")
	}
	return nil
}

// Close stops every vTPM (state kept), or with KeepRunning leaves them
// running for the next vtpmd, and discards the pool.
func (b *Backend) Close(ctx context.Context) error {
	b.closePool(ctx)
	b.mu.Lock()
	ids := make([]string, 0, len(b.runs))
	for id := range b.runs {
		ids = append(ids, id)
	}
	b.mu.Unlock()
	var errs []error
	for _, id := range ids {
		if b.cfg.KeepRunning {
			b.release(id)
		} else {
			errs = append(errs, b.stopRun(ctx, id))
		}
	}
	return errors.Join(errs...)
}

// Running reports the pid of a vTPM's current swtpm, or 0.
func (b *Backend) Running(id string) int {
	b.mu.Lock()
	s := b.runs[id]
	b.mu.Unlock()
	if s == nil {
		return 0
	}
	return s.pid()
}

// Drift compares the state directories with the records of this host's
// vTPMs: a directory no record refers to is an orphan (deleted with repair,
// after killing any swtpm still serving it); a manufactured record whose
// state is gone is reported. Records are never touched. The directories are
// listed before the records are read: a record always exists before its
// directory, so a vTPM being created is never taken for an orphan.
func (b *Backend) Drift(ctx context.Context, records func(context.Context) ([]*store.VTPM, error), repair bool) ([]api.Finding, error) {
	entries, err := os.ReadDir(b.cfg.Root)
	if err != nil {
		return nil, err
	}
	vs, err := records(ctx)
	if err != nil {
		return nil, err
	}
	ids := map[string]bool{}
	findings := []api.Finding{}
	for _, v := range vs {
		ids[v.InstanceID] = true
		if len(v.EKs) == 0 || v.Desired == store.DesiredDeleted {
			continue
		}
		if _, err := os.Stat(filepath.Join(b.dir(v.InstanceID), IdentityFile)); errors.Is(err, fs.ErrNotExist) {
			findings = append(findings, api.Finding{Kind: "missing_state", Object: b.dir(v.InstanceID), InstanceID: v.InstanceID,
				Detail: "the vTPM was manufactured but its state is gone"})
		} else if err != nil {
			return nil, err
		}
	}
	for _, e := range entries {
		if !e.IsDir() || ids[e.Name()] || strings.HasPrefix(e.Name(), ".") { // .pool is vtpmd's own
			continue
		}
		dir := b.dir(e.Name())
		f := api.Finding{Kind: "orphan_state", Object: dir, Detail: "TPM state that no vTPM refers to"}
		if repair {
			if _, err := swtpm.KillStale(swtpm.Instance{Dir: dir}); err != nil {
				return nil, err
			}
			if err := os.RemoveAll(dir); err != nil {
				return nil, err
			}
			f.Deleted = true
		}
		findings = append(findings, f)
	}
	return findings, nil
}
