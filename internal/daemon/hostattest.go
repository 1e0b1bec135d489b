package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attestor"
)

// hostAttester attests this host's own TPM to the verifier through the
// API, as a guest agent does for its vTPM, so that every instance's
// verdict carries its host's.
type hostAttester struct {
	path     string // the TPM, as attestor.OpenTPM takes it
	interval time.Duration
	log      *slog.Logger

	mu    sync.Mutex // one TPM conversation at a time
	tpm   transport.TPMCloser
	agent attestor.Agent // registered while tpm is open
}

func newHostAttester(cfg Config, apiURL string, tlsConfig *tls.Config, log *slog.Logger) *hostAttester {
	api := client.New(apiURL, "")
	if tlsConfig != nil {
		api = api.WithTLS(tlsConfig)
	}
	return &hostAttester{path: cfg.HostTPM, interval: cfg.HostAttestInterval, log: log,
		agent: attestor.Agent{API: api, Subject: client.Host(cfg.HostName),
			EventLog: cfg.HostEventLog, IMALog: cfg.HostIMALog, EKCertificate: true}}
}

// attest opens and registers the host's TPM if need be, then pushes one
// quote. After a failure the next attempt starts over: the TPM may have
// been reset (a host reboot) or the verifier may have lost the
// registration.
func (h *hostAttester) attest(ctx context.Context) (api.Attestation, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.tpm == nil {
		tpm, err := attestor.OpenTPM(h.path)
		if err != nil {
			return api.Attestation{}, fmt.Errorf("opening the host TPM %s: %w", h.path, err)
		}
		h.tpm, h.agent.TPM = tpm, tpm
		if err := h.agent.Register(ctx); err != nil {
			h.closeTPM()
			return api.Attestation{}, fmt.Errorf("registering the host TPM: %w", err)
		}
	}
	a, err := h.agent.Attest(ctx)
	if err != nil {
		h.closeTPM()
		return a, fmt.Errorf("attesting the host: %w", err)
	}
	return a, nil
}

// api is the API client of the host's registered agent: it carries the
// agent token the host's TPM earned.
func (h *hostAttester) api() *client.Client {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.agent.API
}

func (h *hostAttester) closeTPM() error {
	if h.tpm == nil {
		return nil
	}
	h.agent.Flush()
	err := h.tpm.Close()
	h.tpm, h.agent.TPM = nil, nil
	return err
}

// close closes the host's TPM; a nil attester (no host TPM) has none.
func (h *hostAttester) close() error {
	if h == nil {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.closeTPM()
}

// run attests on the interval, and when the verifier asks, until ctx ends.
func (h *hostAttester) run(ctx context.Context) {
	last := ""
	for {
		a, err := h.attest(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			h.log.Warn("host attestation failed", "err", err)
		case err == nil && a.Verdict != last:
			h.log.Info("host attestation", "verdict", a.Verdict, "reasons", strings.Join(a.Reasons, "; "))
			last = a.Verdict
		}
		h.mu.Lock()
		agent := h.agent // Register swaps its API client (the agent's token)
		h.mu.Unlock()
		agent.Wait(ctx, h.interval)
		if ctx.Err() != nil {
			return
		}
	}
}

// AttestHost makes the host attest now and returns its verdict; an error
// if this host has no TPM configured (HostTPM).
func (h *HostAgent) AttestHost(ctx context.Context) (api.Attestation, error) {
	if h.hostTPM == nil {
		return api.Attestation{}, fmt.Errorf("host %s attests no TPM (no host TPM configured)", h.cfg.HostName)
	}
	return h.hostTPM.attest(ctx)
}

// hostEKRoots reads the PEM file of CAs that hosts' EK certificates may
// chain to; nil when none is configured.
func hostEKRoots(path string) (*x509.CertPool, error) {
	if path == "" {
		return nil, nil
	}
	pool, err := client.LoadCAs(path)
	if err != nil {
		return nil, fmt.Errorf("host EK CA: %w", err)
	}
	return pool, nil
}
