package daemon

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"sync"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/backend/direct"
	"github.com/vtpmd/vtpmd/internal/backend/libvirt"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
)

// HostAgent is a running host agent: the host's backend and swtpm
// runtime, and the agent that reconciles them with the control plane's
// records.
type HostAgent struct {
	// XenUUIDAddr is where the Xen UUID service listens; "" if not served.
	XenUUIDAddr string
	cfg         Config
	log         *slog.Logger
	records     agent.Records
	keepRunning bool               // vTPMs outlive the agent
	swtpm       *swtpmhost.Runtime // runs swtpm, for the swtpm backend or under libvirt's
	host        hostBackend        // what the agent drives
	agent       *agent.Agent
	hostTPM     *hostAttester // nil when the host attests no TPM
	xenUUID     *http.Server  // the Xen UUID service, when served
	// stopBackground ends host attestation.
	stopBackground context.CancelFunc
	// tasks run beside the agent while Run runs (renewing the host's
	// certificate).
	tasks []func(context.Context)
}

// startHostAgent starts the host's backend and its agent on records, with
// EK certificates from certifier, and brings back every vTPM that should
// run. When the control plane cannot be reached it still starts: Run
// keeps trying. With keepRunning, vTPMs outlive the agent: a stopped agent
// leaves them running, and the next one takes them back.
func startHostAgent(ctx context.Context, cfg Config, records agent.Records, certifier swtpmhost.Certifier, keepRunning bool, log *slog.Logger) (*HostAgent, error) {
	h := &HostAgent{cfg: cfg, log: log, records: records, keepRunning: keepRunning || cfg.libvirtExternal()}
	if err := h.start(ctx, certifier); err != nil {
		return nil, errors.Join(err, h.close(context.WithoutCancel(ctx)))
	}
	return h, nil
}

func (h *HostAgent) start(ctx context.Context, certifier swtpmhost.Certifier) error {
	cfg := h.cfg
	var err error
	if cfg.libvirtExternal() && cfg.SocketGroup == "" {
		// QEMU connects to vtpmd's swtpm as whatever libvirt runs it as.
		if cfg.SocketGroup, err = libvirt.QEMUGroup(cfg.Libvirt.Socket); err != nil {
			return fmt.Errorf("libvirt backend: %w", err)
		}
	}
	h.swtpm, err = swtpmhost.New(swtpmhost.Config{
		Root: filepath.Join(cfg.DataDir, "vtpms"), SocketDir: cfg.SocketDir, SocketGroup: cfg.SocketGroup,
		User: cfg.SwtpmUser, Group: cfg.SwtpmGroup,
		Binary: cfg.SwtpmBinary, PCRBanks: cfg.PCRBanks, Certifier: certifier, Log: h.log, PoolSize: poolSize(cfg),
		KeepRunning: h.keepRunning,
	})
	if err != nil {
		return err
	}
	if !h.keepRunning {
		if err := h.sweep(); err != nil {
			return err
		}
	}
	h.host = direct.New(h.swtpm)
	switch cfg.Backend {
	case "libvirt":
		h.host, err = libvirt.New(ctx, libvirt.Config{
			Mode: libvirt.Mode(cfg.Libvirt.Mode), EnableVTPM: cfg.Libvirt.EnableVTPM, Socket: cfg.Libvirt.Socket,
			MigrationURI: cfg.Libvirt.MigrationURI,
			SwtpmUser:    cfg.SwtpmUser, SwtpmGroup: cfg.SwtpmGroup, SecretSecurity: cfg.Libvirt.SecretSecurity,
			Swtpm: h.swtpm, Log: h.log,
		})
		if err != nil {
			return fmt.Errorf("libvirt backend: %w", err)
		}
	case "xen":
		if h.host, err = h.startXen(); err != nil {
			return fmt.Errorf("xen backend: %w", err)
		}
	}
	h.agent = &agent.Agent{Host: cfg.HostName, Capacity: cfg.Capacity, Records: h.records, Backend: h.host, Log: h.log,
		HeartbeatInterval: cfg.HeartbeatInterval}
	// Bring back every vTPM that should run before the API answers, so that
	// no phase it reports is left over from before a restart.
	if err := h.agent.Register(ctx); err != nil {
		h.log.Warn("registering the host failed; retrying while running", "host", cfg.HostName, "err", err)
		return nil
	}
	if err := h.agent.Reconcile(ctx); err != nil {
		return fmt.Errorf("restoring vTPMs: %w", err)
	}
	if h.keepRunning {
		// Kept swtpm processes were adopted by the pass; the rest go.
		if err := h.sweep(); err != nil {
			return err
		}
	}
	h.reportDrift(ctx)
	return nil
}

// attestHost attests the host's own TPM with att, nil for a host that
// attests none, until Shutdown.
func (h *HostAgent) attestHost(att *hostAttester) {
	if att == nil {
		return
	}
	var bg context.Context
	bg, h.stopBackground = context.WithCancel(context.Background())
	h.hostTPM = att
	go att.run(bg)
}

// Run reconciles, and runs the agent's tasks, until ctx ends.
func (h *HostAgent) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, task := range h.tasks {
		wg.Go(func() { task(ctx) })
	}
	return h.agent.Run(ctx)
}

// Shutdown stops every vTPM (state kept; in libvirt's external mode the
// guests' swtpm keep running) and the backend.
func (h *HostAgent) Shutdown(ctx context.Context) error { return h.close(ctx) }

func (h *HostAgent) close(ctx context.Context) error {
	if h.stopBackground != nil {
		h.stopBackground()
	}
	var errs []error
	if h.swtpm != nil {
		errs = append(errs, h.swtpm.Close(ctx))
	}
	if h.hostTPM != nil {
		errs = append(errs, h.hostTPM.close())
	}
	if h.xenUUID != nil {
		errs = append(errs, h.xenUUID.Shutdown(ctx))
	}
	if lb, ok := h.host.(*libvirt.Backend); ok {
		errs = append(errs, lb.Close())
	}
	return errors.Join(errs...)
}

// poolSize is the pool the swtpm runtime keeps: none when it serves the
// libvirt backend, whose agent does not claim from it.
func poolSize(cfg Config) int {
	if cfg.Backend != "swtpm" {
		return 0
	}
	return *cfg.PoolSize
}

// hostBackend is every backend a host runs: each can report drift.
type hostBackend interface {
	agent.Backend
	agent.Drifter
}

// reportDrift logs what differs between the host and the records; only an
// operator's explicit repair deletes anything.
func (h *HostAgent) reportDrift(ctx context.Context) {
	findings, err := h.host.Drift(ctx, h.agent.Held, false)
	if err != nil {
		h.log.Warn("checking drift", "err", err)
		return
	}
	for _, f := range findings {
		h.log.Warn("drift (vtpmctl doctor lists it; --delete-orphans removes orphans)", "kind", f.Kind, "object", f.Object,
			"instance", f.InstanceID, "detail", f.Detail)
	}
}

// sweep kills swtpm processes that no vTPM here runs.
func (h *HostAgent) sweep() error {
	n, err := h.swtpm.Sweep()
	if err != nil {
		return fmt.Errorf("sweeping stale swtpm processes: %w", err)
	}
	if n > 0 {
		h.log.Warn("killed swtpm processes left by an earlier run", "count", n)
	}
	return nil
}

// certifier issues vTPMs' EK certificates from the deployment CA, through
// the CA itself (all-in-one) or the server (certifyEK, a host's agent).
type certifier func(ctx context.Context, instanceID string, v spec.Version, pub crypto.PublicKey) ([]byte, error)

func (c certifier) CertifyEK(ctx context.Context, instanceID string, v spec.Version, _ swtpm.EKKind, pub crypto.PublicKey) ([]byte, error) {
	return c(ctx, instanceID, v, pub)
}
