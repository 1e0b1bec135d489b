package daemon

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
)

// AllInOne is vtpmd all-in-one: a server and this host's agent in one
// process, the agent on the server's records in-process (agentstore), as
// a host's agent is on them over the agent protocol.
type AllInOne struct {
	*Server
	agent *HostAgent
	// XenUUIDAddr is where the Xen UUID service listens; "" if not served.
	XenUUIDAddr string
}

// StartAllInOne opens (creating on first start) everything under
// cfg.DataDir, starts the agent (every vTPM that should run is running
// when it returns) and serves the API. Stop it with Shutdown.
func StartAllInOne(ctx context.Context, cfg Config, log *slog.Logger) (*AllInOne, error) {
	cfg.Defaults()
	if err := cfg.checkHeartbeats(); err != nil {
		return nil, fmt.Errorf("invalid configuration: %w", err)
	}
	s, err := openServer(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	authority := s.authority
	issue := certifier(func(_ context.Context, _ string, v spec.Version, pub crypto.PublicKey) ([]byte, error) {
		return authority.IssueVTPMEK(pub, string(v))
	})
	// Guests hold their vTPM's swtpm in libvirt's external mode: it
	// outlives a restart of vtpmd, which takes it back (QEMU never
	// reconnects). Otherwise all-in-one stops its vTPMs with it.
	h, err := startHostAgent(ctx, s.cfg, s.agents, issue, false, s.log)
	if err != nil {
		return nil, errors.Join(err, s.close())
	}
	s.serve()
	if cfg.HostTPM != "" {
		h.attestHost(newHostAttester(s.cfg, s.URL, s.self, s.log))
	}
	return &AllInOne{Server: s, agent: h, XenUUIDAddr: h.XenUUIDAddr}, nil
}

// Run reconciles until ctx ends.
func (d *AllInOne) Run(ctx context.Context) error { return d.agent.Run(ctx) }

// Shutdown stops the API, then every vTPM (state kept), then the store.
func (d *AllInOne) Shutdown(ctx context.Context) error {
	return errors.Join(d.Server.Shutdown(ctx), d.agent.Shutdown(ctx))
}

// Swtpm exposes the host's swtpm runtime (tests look at its processes).
func (d *AllInOne) Swtpm() *swtpmhost.Runtime { return d.agent.swtpm }

// AttestHost makes the host attest now and returns its verdict.
func (d *AllInOne) AttestHost(ctx context.Context) (api.Attestation, error) {
	return d.agent.AttestHost(ctx)
}
