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
	// User and Group run swtpm; empty means vtpmd's own.
	User, Group string
	// Binary is the swtpm binary; default "swtpm".
	Binary    string
	Certifier Certifier
	// PCRBanks allocated at manufacture; default sha256.
	PCRBanks []string
	Log      *slog.Logger
}

// Backend runs and supervises swtpm processes.
type Backend struct {
	cfg  Config
	log  *slog.Logger
	mu   sync.Mutex
	runs map[string]*supervisor
}

var _ agent.Backend = (*Backend)(nil)

// New makes a backend; it creates Root (0700).
func New(cfg Config) (*Backend, error) {
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return nil, fmt.Errorf("creating vTPM root: %w", err)
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Backend{cfg: cfg, log: log, runs: map[string]*supervisor{}}, nil
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
	i := swtpm.Instance{Dir: b.dir(id)}
	return api.Sockets{Data: i.DataSocket(), Ctrl: i.CtrlSocket()}
}

func (b *Backend) dir(id string) string { return filepath.Join(b.cfg.Root, id) }

func (b *Backend) instance(v *store.VTPM, secret []byte) swtpm.Instance {
	return swtpm.Instance{Dir: b.dir(v.InstanceID), Version: v.Spec.Version, Secret: secret,
		User: b.cfg.User, Group: b.cfg.Group, Binary: b.cfg.Binary}
}

// identityFile records a manufactured vTPM's public identity next to its
// state. It is written last, so its presence means manufacturing finished.
const identityFile = "identity.json"

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

// manufacture makes a new TPM from scratch; leftovers of an interrupted
// attempt are wiped first.
func (b *Backend) manufacture(ctx context.Context, v *store.VTPM, inst swtpm.Instance) ([]store.EK, error) {
	b.stopRun(ctx, v.InstanceID)
	if err := os.RemoveAll(inst.Dir); err != nil {
		return nil, fmt.Errorf("clearing half-made state: %w", err)
	}
	start := time.Now()
	id, proc, err := swtpm.ManufactureAndStart(ctx, inst, swtpm.ManufactureOptions{
		PCRBanks: b.cfg.PCRBanks,
		Log:      b.log,
		Certify: func(ctx context.Context, kind swtpm.EKKind, pub crypto.PublicKey) ([]byte, error) {
			return b.cfg.Certifier.CertifyEK(ctx, v.InstanceID, v.Spec.Version, kind, pub)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("manufacturing: %w", err)
	}
	var eks []store.EK
	for _, ek := range id.EKs {
		der, err := x509.MarshalPKIXPublicKey(ek.Public)
		if err != nil {
			proc.Stop(ctx)
			return nil, fmt.Errorf("encoding EK: %w", err)
		}
		eks = append(eks, store.EK{Kind: string(ek.Kind), Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: der, CertDER: ek.CertDER})
	}
	data, err := json.Marshal(eks)
	if err != nil {
		proc.Stop(ctx)
		return nil, err
	}
	if err := atomicfile.Write(filepath.Join(inst.Dir, identityFile), data, 0o600); err != nil {
		proc.Stop(ctx)
		return nil, fmt.Errorf("recording identity: %w", err)
	}
	b.log.Info("manufactured vTPM", "instance", v.InstanceID, "version", v.Spec.Version, "took", time.Since(start))
	// The manufacturing process goes on serving: no second start.
	b.supervise(v.InstanceID, inst, proc)
	return eks, nil
}

func readIdentity(dir string) ([]store.EK, error) {
	data, err := os.ReadFile(filepath.Join(dir, identityFile))
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
	return nil
}

// Close stops every vTPM (state kept).
func (b *Backend) Close(ctx context.Context) error {
	b.mu.Lock()
	ids := make([]string, 0, len(b.runs))
	for id := range b.runs {
		ids = append(ids, id)
	}
	b.mu.Unlock()
	var errs []error
	for _, id := range ids {
		errs = append(errs, b.stopRun(ctx, id))
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
