package daemon

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/agent/agentclient"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// StartAgent starts vtpmd agent: this host's agent, reporting to the
// server cfg.Server over the agent protocol with the host's certificate.
// At the first start it enrols with the join token in cfg.JoinTokenFile;
// the certificate and its key (made here, never sent) stay in
// <DataDir>/host-cert. Stop it with Shutdown.
func StartAgent(ctx context.Context, cfg Config, log *slog.Logger) (*HostAgent, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid configuration: %w", err)
	}
	if cfg.Server == "" {
		return nil, errors.New("invalid configuration: vtpmd agent needs the server's URL (--server https://...)")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := privateDir(cfg.DataDir); err != nil {
		return nil, err
	}
	trust := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.ServerCA != "" {
		var err error
		if trust.RootCAs, err = client.LoadCAs(cfg.ServerCA); err != nil {
			return nil, fmt.Errorf("server CA: %w", err)
		}
	}
	// The host's own TPM, if it has one, registers first: its agent token
	// binds the enrolment to it.
	var att *hostAttester
	enrolWith := client.New(cfg.Server, "").WithTLS(trust)
	if cfg.HostTPM != "" {
		att = newHostAttester(cfg, cfg.Server, trust, log)
		if _, err := att.attest(ctx); err != nil && !hasHostCredentials(cfg) {
			return nil, errors.Join(fmt.Errorf("the host's TPM must register before the host enrols: %w", err), att.close())
		}
		enrolWith = att.api()
	}
	creds, err := loadHostCredentials(ctx, cfg, enrolWith, log)
	if err != nil {
		return nil, errors.Join(err, att.close())
	}
	mtls := trust.Clone()
	mtls.GetClientCertificate = creds.get
	c := client.New(cfg.Server, "").WithTLS(mtls)
	issue := certifier(func(ctx context.Context, instanceID string, v spec.Version, pub crypto.PublicKey) ([]byte, error) {
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return nil, err
		}
		return c.CertifyEK(ctx, api.EKCertificateRequest{InstanceID: instanceID, TPMVersion: string(v), Public: der})
	})
	// A host's vTPMs outlive its agent: stopping or upgrading it, or
	// losing the server, never stops a guest's TPM.
	h, err := startHostAgent(ctx, cfg, agentclient.New(c), issue, true, log)
	if err != nil {
		return nil, errors.Join(err, att.close())
	}
	h.attestHost(att)
	h.tasks = append(h.tasks, func(ctx context.Context) { creds.renewWhenDue(ctx, c, log) })
	return h, nil
}

// The host's credentials: <DataDir>/host-cert/host.pem holds its
// certificate and key together, so that a renewal replaces both in one
// rename; ca.pem is the host CA's chain, for the operator's eyes.
const (
	hostCertDir   = "host-cert"
	hostCredsFile = "host.pem"
	hostCAFile    = "ca.pem"
)

// hostCredentials are the host's certificate and key, renewed in place:
// the agent's TLS client asks for the current one at each handshake.
type hostCredentials struct {
	dir  string
	cert atomic.Pointer[tls.Certificate]
}

// hasHostCredentials reports whether the host enrolled already.
func hasHostCredentials(cfg Config) bool {
	_, err := os.Stat(filepath.Join(cfg.DataDir, hostCertDir, hostCredsFile))
	return err == nil
}

// loadHostCredentials loads the host's certificate and key, enrolling
// first, through api, if the host has none. The certificate must name
// cfg.HostName.
func loadHostCredentials(ctx context.Context, cfg Config, api *client.Client, log *slog.Logger) (*hostCredentials, error) {
	h := &hostCredentials{dir: filepath.Join(cfg.DataDir, hostCertDir)}
	path := filepath.Join(h.dir, hostCredsFile)
	enrolledNow := !hasHostCredentials(cfg)
	if enrolledNow {
		if err := h.enrol(ctx, cfg, api); err != nil {
			return nil, err
		}
	}
	cert, err := tls.LoadX509KeyPair(path, path)
	if err != nil {
		return nil, fmt.Errorf("the host's certificate: %w", err)
	}
	if cn := cert.Leaf.Subject.CommonName; cn != cfg.HostName {
		return nil, fmt.Errorf("this host enrolled as %q but is configured as %q: set --host-name %s, or enrol again (remove %s)",
			cn, cfg.HostName, cn, h.dir)
	}
	if enrolledNow {
		log.Info("enrolled: this host's certificate is in the data dir", "host", cfg.HostName, "dir", h.dir)
	}
	h.cert.Store(&cert)
	return h, nil
}

func (h *hostCredentials) get(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return h.cert.Load(), nil
}

// enrol exchanges the join token for a certificate of a key made here.
func (h *hostCredentials) enrol(ctx context.Context, cfg Config, c *client.Client) error {
	if cfg.JoinTokenFile == "" {
		return fmt.Errorf("host %s has no certificate yet: start it once with --join-token-file (the operator runs 'vtpmctl host add %s')", cfg.HostName, cfg.HostName)
	}
	raw, err := os.ReadFile(cfg.JoinTokenFile)
	if err != nil {
		return fmt.Errorf("reading the join token: %w", err)
	}
	return h.issue(func(csr []byte) (api.Enrollment, error) {
		e, err := c.Enroll(ctx, api.EnrollRequest{JoinToken: strings.TrimSpace(string(raw)), CSR: csr})
		if err != nil {
			return e, fmt.Errorf("enrolling host %s with its join token: %w", cfg.HostName, err)
		}
		return e, nil
	})
}

// renewWhenDue renews the certificate once less than a third of its life
// is left, checking hourly until ctx ends; a failed renewal is retried at
// the next check.
func (h *hostCredentials) renewWhenDue(ctx context.Context, c *client.Client, log *slog.Logger) {
	t := time.NewTicker(time.Hour)
	defer t.Stop()
	for {
		leaf := h.cert.Load().Leaf
		if time.Until(leaf.NotAfter) < leaf.NotAfter.Sub(leaf.NotBefore)/3 {
			if err := h.renew(ctx, c); err != nil {
				log.Warn("renewing the host's certificate failed; retrying in an hour", "not_after", leaf.NotAfter, "err", err)
			} else {
				log.Info("renewed the host's certificate", "not_after", h.cert.Load().Leaf.NotAfter)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// renew replaces the certificate with one of a new key, asked for with the
// current one.
func (h *hostCredentials) renew(ctx context.Context, c *client.Client) error {
	return h.issue(func(csr []byte) (api.Enrollment, error) { return c.Renew(ctx, api.RenewRequest{CSR: csr}) })
}

// issue makes a key, has request certify it, and keeps both in one file
// (replaced whole), then uses them.
func (h *hostCredentials) issue(request func(csr []byte) (api.Enrollment, error)) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return err
	}
	e, err := request(csr)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	creds := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.Certificate}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})...)
	if err := os.MkdirAll(h.dir, 0o700); err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(h.dir, hostCAFile), []byte(e.CAChain), 0o644); err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(h.dir, hostCredsFile), creds, 0o600); err != nil {
		return err
	}
	cert, err := tls.X509KeyPair(creds, creds)
	if err != nil {
		return err
	}
	h.cert.Store(&cert)
	return nil
}
