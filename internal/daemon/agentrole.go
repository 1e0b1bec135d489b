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
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

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
	cert, err := hostCertificate(ctx, cfg, trust, log)
	if err != nil {
		return nil, err
	}
	mtls := trust.Clone()
	mtls.Certificates = []tls.Certificate{cert}
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
		return nil, err
	}
	h.attestHost(cfg.Server, trust)
	return h, nil
}

// The host's credentials in <DataDir>/host-cert.
const (
	hostCertDir  = "host-cert"
	hostCertFile = "cert.pem"
	hostKeyFile  = "key.pem"
	hostCAFile   = "ca.pem" // the host CA's chain, for the operator's eyes
)

// hostCertificate loads the host's certificate and key, enrolling first
// if the host has none. The certificate must name cfg.HostName.
func hostCertificate(ctx context.Context, cfg Config, trust *tls.Config, log *slog.Logger) (tls.Certificate, error) {
	dir := filepath.Join(cfg.DataDir, hostCertDir)
	certPath, keyPath := filepath.Join(dir, hostCertFile), filepath.Join(dir, hostKeyFile)
	_, err := os.Stat(certPath)
	enrolledNow := errors.Is(err, fs.ErrNotExist)
	if enrolledNow {
		if err := enrolHost(ctx, cfg, trust, dir); err != nil {
			return tls.Certificate{}, err
		}
	}
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("the host's certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return tls.Certificate{}, err
	}
	if leaf.Subject.CommonName != cfg.HostName {
		return tls.Certificate{}, fmt.Errorf("this host enrolled as %q but is configured as %q: set --host-name %s, or enrol again (remove %s)",
			leaf.Subject.CommonName, cfg.HostName, leaf.Subject.CommonName, dir)
	}
	if enrolledNow {
		log.Info("enrolled: this host's certificate is in the data dir", "host", cfg.HostName, "dir", dir)
	}
	return cert, nil
}

// enrolHost exchanges the join token for a certificate of a key made
// here, and keeps both in dir: the key first, so that a certificate on
// disk always has its key.
func enrolHost(ctx context.Context, cfg Config, trust *tls.Config, dir string) error {
	if cfg.JoinTokenFile == "" {
		return fmt.Errorf("host %s has no certificate yet: start it once with --join-token-file (the operator runs 'vtpmctl host add %s')", cfg.HostName, cfg.HostName)
	}
	raw, err := os.ReadFile(cfg.JoinTokenFile)
	if err != nil {
		return fmt.Errorf("reading the join token: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return err
	}
	e, err := client.New(cfg.Server, "").WithTLS(trust).Enroll(ctx, api.EnrollRequest{JoinToken: strings.TrimSpace(string(raw)), CSR: csr})
	if err != nil {
		return fmt.Errorf("enrolling host %s with its join token: %w", cfg.HostName, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(dir, hostKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(dir, hostCAFile), []byte(e.CAChain), 0o644); err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, hostCertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.Certificate}), 0o644)
}
