// Package swtpmhost is the host's swtpm runtime, which the swtpm backend
// and the libvirt backend share. It keeps each vTPM of the host as a swtpm
// process (package swtpm) serving the state directory <Root>/<instance>/,
// reachable at tpm.sock (TPM commands) and tpm.sock.ctrl (control channel,
// for QEMU):
//
//   - identity: a vTPM is manufactured once, its public identity (EKs and
//     their certificates) recorded beside its state last, and never made
//     again over that state;
//   - supervision: a swtpm that exits is restarted with backoff, and a TPM
//     in failure mode is restarted on its saved state when no guest holds
//     it;
//   - adoption: with KeepRunning, swtpm processes outlive vtpmd and the
//     next vtpmd takes them back; Sweep kills those no vTPM took;
//   - the pool: manufactured TPM 2.0s kept ready for new vTPMs.
package swtpmhost

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
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// Certifier issues EK certificates; the deployment CA is one.
type Certifier interface {
	CertifyEK(ctx context.Context, instanceID string, v spec.Version, kind swtpm.EKKind, pub crypto.PublicKey) ([]byte, error)
}

// Config configures the runtime.
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

// Runtime runs and supervises the host's swtpm processes.
type Runtime struct {
	cfg  Config
	log  *slog.Logger
	mu   sync.Mutex
	runs map[string]*supervisor
	pool *pool // nil without a pool
	// clients is which sockets clients hold, read once for many checks.
	clients clients
}

// New makes a runtime; it creates Root (0700) and SocketDir, and starts
// filling the pool.
func New(cfg Config) (*Runtime, error) {
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
	r := &Runtime{cfg: cfg, log: log, runs: map[string]*supervisor{}}
	if cfg.PoolSize > 0 {
		if err := r.startPool(cfg.PoolSize); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// Sockets are where clients attach to vTPM id.
func (r *Runtime) Sockets(id string) api.Sockets {
	i := swtpm.Instance{Dir: r.dir(id), Socket: r.socket(id)}
	return api.Sockets{Data: i.DataSocket(), Ctrl: i.CtrlSocket()}
}

func (r *Runtime) dir(id string) string { return filepath.Join(r.cfg.Root, id) }

// socket is vTPM id's data socket, or "" for the default in its directory.
func (r *Runtime) socket(id string) string {
	if r.cfg.SocketDir == "" {
		return ""
	}
	return filepath.Join(r.cfg.SocketDir, id+".sock")
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
func (r *Runtime) Dir(id string) string { return r.dir(id) }

func (r *Runtime) instance(v agent.VTPM, secret []byte) swtpm.Instance {
	return swtpm.Instance{Dir: r.dir(v.InstanceID), Socket: r.socket(v.InstanceID), SocketGroup: r.cfg.SocketGroup,
		Version: v.Spec.Version, Secret: secret, User: r.cfg.User, Group: r.cfg.Group, Binary: r.cfg.Binary, Keep: r.cfg.KeepRunning}
}

// IdentityFile records a manufactured vTPM's public identity next to its
// state. It is written last, so its presence means manufacturing finished.
const IdentityFile = "identity.json"

// Ensure makes v's TPM run under supervision, manufacturing it first with
// secret as its state key if its directory holds no finished TPM (wiping
// what an interrupted attempt left), and returns its EKs. It refuses to
// manufacture a TPM v says was made already. An import of v's state that
// a crash interrupted is settled first (settleImport).
func (r *Runtime) Ensure(ctx context.Context, v agent.VTPM, secret []byte) ([]agent.EK, error) {
	if err := r.settleImport(r.dir(v.InstanceID)); err != nil {
		return nil, err
	}
	inst := r.instance(v, secret)
	eks, err := readIdentity(inst.Dir)
	switch {
	case errors.Is(err, fs.ErrNotExist) && v.Manufactured:
		// v's record says it was manufactured: never wipe a TPM we made.
		return nil, fmt.Errorf("state of %s is missing its identity; refusing to re-manufacture over it", v.InstanceID)
	case errors.Is(err, fs.ErrNotExist):
		if eks, err = r.manufacture(ctx, v, inst); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	}
	return eks, r.start(ctx, v.InstanceID, inst)
}

// manufacture makes a new TPM from scratch and leaves it serving;
// leftovers of an interrupted attempt are wiped first.
func (r *Runtime) manufacture(ctx context.Context, v agent.VTPM, inst swtpm.Instance) ([]agent.EK, error) {
	r.Stop(ctx, v.InstanceID)
	eks, proc, err := r.make(ctx, v, inst, true)
	if err != nil {
		return nil, err
	}
	// The manufacturing process goes on serving: no second start.
	r.supervise(v.InstanceID, inst, proc)
	return eks, nil
}

// Manufacture makes v's TPM in dir and stops it, for a TPM that another
// program runs (libvirt's swtpm). A dir that already holds a manufactured
// TPM is kept and its EKs returned; a half-made one is wiped and made again.
// An import into dir that a crash interrupted is settled first.
func (r *Runtime) Manufacture(ctx context.Context, v agent.VTPM, secret []byte, dir string) ([]agent.EK, error) {
	if err := r.settleImport(dir); err != nil {
		return nil, err
	}
	if eks, err := readIdentity(dir); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return eks, err
	}
	if v.Manufactured {
		return nil, fmt.Errorf("state of %s is missing its identity; refusing to re-manufacture over it", v.InstanceID)
	}
	inst := r.instance(v, secret)
	inst.Dir = dir
	eks, _, err := r.make(ctx, v, inst, false)
	return eks, err
}

// make manufactures inst from an empty directory and records its identity
// next to the state, last, so that the identity file means "finished".
// With serve, the manufacturing swtpm is left running and returned.
func (r *Runtime) make(ctx context.Context, v agent.VTPM, inst swtpm.Instance, serve bool) (_ []agent.EK, proc *swtpm.Process, err error) {
	// A half-made TPM may still run, kept by an agent that died making it
	// (KeepRunning): it goes with its state, which holds its pid file.
	if _, err := swtpm.KillStale(inst); err != nil {
		return nil, nil, fmt.Errorf("stopping a half-made TPM: %w", err)
	}
	if err := os.RemoveAll(inst.Dir); err != nil {
		return nil, nil, fmt.Errorf("clearing half-made state: %w", err)
	}
	start := time.Now()
	opts := swtpm.ManufactureOptions{
		PCRBanks: r.cfg.PCRBanks,
		Log:      r.log,
		Certify: func(ctx context.Context, kind swtpm.EKKind, pub crypto.PublicKey) ([]byte, error) {
			return r.cfg.Certifier.CertifyEK(ctx, v.InstanceID, v.Spec.Version, kind, pub)
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
	eks, err := recordIdentity(inst.Dir, id)
	if err != nil {
		return nil, nil, err
	}
	r.log.Info("manufactured vTPM", "instance", v.InstanceID, "incarnation", v.Incarnation, "version", v.Spec.Version, "took", time.Since(start))
	return eks, proc, nil
}

// Identify takes over a TPM another program manufactured in dir (Nova's,
// through libvirt's swtpm_setup), keyed by secret: it reads the TPM's
// identity from a private copy of its state (swtpm.Identify; the state is
// not touched) and records it beside the state, as Manufacture does for
// the TPMs it makes, so that from then on the TPM counts as manufactured
// and Manufacture returns its EKs. TPM 2.0 only. Doing it again reads the
// state again: the secret is checked every time.
func (r *Runtime) Identify(ctx context.Context, v agent.VTPM, secret []byte, dir string) ([]agent.EK, error) {
	if v.Spec.Version != spec.V20 {
		return nil, fmt.Errorf("only a TPM 2.0 can be taken over, not %s", v.Spec.Version)
	}
	id, err := swtpm.Identify(ctx, dir, r.cfg.Root, secret, r.cfg.Binary, r.log)
	if err != nil {
		return nil, err
	}
	eks, err := recordIdentity(dir, id)
	if err != nil {
		return nil, err
	}
	r.log.Info("took over vTPM", "instance", v.InstanceID, "incarnation", v.Incarnation, "eks", len(eks))
	return eks, nil
}

// recordIdentity writes id beside the state in dir (IdentityFile), last.
func recordIdentity(dir string, id *swtpm.Identity) ([]agent.EK, error) {
	var eks []identityEK
	for _, ek := range id.EKs {
		der, err := x509.MarshalPKIXPublicKey(ek.Public)
		if err != nil {
			return nil, fmt.Errorf("encoding EK: %w", err)
		}
		eks = append(eks, identityEK{Kind: string(ek.Kind), Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: der, CertDER: ek.CertDER})
	}
	data, err := json.Marshal(eks)
	if err != nil {
		return nil, err
	}
	if err := atomicfile.Write(filepath.Join(dir, IdentityFile), data, 0o600); err != nil {
		return nil, fmt.Errorf("recording identity: %w", err)
	}
	return agentEKs(eks), nil
}

// identityEK is one EK as IdentityFile records it.
type identityEK struct {
	Kind      string `json:"kind"`
	Handle    uint32 `json:"handle"`
	NVIndex   uint32 `json:"nv_index,omitempty"`
	PublicDER []byte `json:"public_der"` // PKIX
	CertDER   []byte `json:"cert_der,omitempty"`
}

func agentEKs(eks []identityEK) []agent.EK {
	var out []agent.EK
	for _, ek := range eks {
		out = append(out, agent.EK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: ek.PublicDER, CertDER: ek.CertDER})
	}
	return out
}

func readIdentity(dir string) ([]agent.EK, error) {
	data, err := os.ReadFile(filepath.Join(dir, IdentityFile))
	if err != nil {
		return nil, err
	}
	var eks []identityEK
	if err := json.Unmarshal(data, &eks); err != nil {
		return nil, fmt.Errorf("reading identity in %s: %w", dir, err)
	}
	return agentEKs(eks), nil
}

// Remove stops vTPM id's swtpm and removes its state, with any state a
// resize set aside. A swtpm of id that an earlier vtpmd started and left
// running, which no supervisor here runs (one a live migration's target
// prepared before its agent was killed, say), is killed too, found
// through the pid file in the state it is about to remove.
func (r *Runtime) Remove(ctx context.Context, id string) error {
	if err := r.Stop(ctx, id); err != nil {
		return err
	}
	pid, err := swtpm.KillStale(swtpm.Instance{Dir: r.dir(id)})
	if err != nil {
		return err
	}
	if pid != 0 {
		r.log.Warn("killed a swtpm an earlier vtpmd left running", "instance", id, "pid", pid)
	}
	if err := os.RemoveAll(r.dir(id)); err != nil {
		return fmt.Errorf("removing state of %s: %w", id, err)
	}
	if err := r.Discard(ctx, id); err != nil {
		return err
	}
	if s := r.socket(id); s != "" {
		// Left behind only by a swtpm killed with vtpmd; nothing listens.
		os.Remove(s)
		os.Remove(s + ".ctrl")
	}
	return nil
}

// Close stops every vTPM (state kept), or with KeepRunning leaves them
// running for the next vtpmd, and discards the pool.
func (r *Runtime) Close(ctx context.Context) error {
	r.closePool(ctx)
	r.mu.Lock()
	ids := make([]string, 0, len(r.runs))
	for id := range r.runs {
		ids = append(ids, id)
	}
	r.mu.Unlock()
	var errs []error
	for _, id := range ids {
		if r.cfg.KeepRunning {
			r.release(id)
		} else {
			errs = append(errs, r.Stop(ctx, id))
		}
	}
	return errors.Join(errs...)
}

// Running reports the pid of a vTPM's current swtpm, or 0.
func (r *Runtime) Running(id string) int {
	r.mu.Lock()
	s := r.runs[id]
	r.mu.Unlock()
	if s == nil {
		return 0
	}
	return s.pid()
}

// Drift compares the state directories with the host's vTPMs (records):
// a directory no vTPM refers to is an orphan (deleted with repair, after
// killing any swtpm still serving it); a manufactured vTPM whose state is
// gone is reported. The directories are listed before the vTPMs are read:
// a vTPM's record always exists before its directory, so one being created
// is never taken for an orphan.
func (r *Runtime) Drift(ctx context.Context, records func(context.Context) ([]agent.VTPM, error), repair bool) ([]api.Finding, error) {
	entries, err := os.ReadDir(r.cfg.Root)
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
		if !v.Manufactured || v.Desired == agent.DesiredDeleted {
			continue
		}
		if _, err := os.Stat(filepath.Join(r.dir(v.InstanceID), IdentityFile)); errors.Is(err, fs.ErrNotExist) {
			findings = append(findings, api.Finding{Kind: "missing_state", Object: r.dir(v.InstanceID), InstanceID: v.InstanceID,
				Detail: "the vTPM was manufactured but its state is gone"})
		} else if err != nil {
			return nil, err
		}
	}
	for _, e := range entries {
		if !e.IsDir() || ids[e.Name()] || strings.HasPrefix(e.Name(), ".") { // .pool is the runtime's own
			continue
		}
		dir := r.dir(e.Name())
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
