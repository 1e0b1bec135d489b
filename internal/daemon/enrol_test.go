package daemon

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/cli"
	"github.com/vtpmd/vtpmd/internal/store"
)

// TestHostEnrolment: with TLS (and no --client-ca), a host added with
// vtpmctl host add enrols over HTTPS with a CSR made here, heartbeats with
// its host certificate and reads up with its version; after vtpmctl host
// revoke its next heartbeat is refused. The host CA is one of the
// deployment's keys sealed in the store, and survives a restart.
func TestHostEnrolment(t *testing.T) {
	dir := t.TempDir()
	caFile, certFile, keyFile := writeTestPKI(t, dir)
	cfg := Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "control", TLSCert: certFile, TLSKey: keyFile}
	u := startConfigured(t, cfg)
	ctx := context.Background()
	vtpmctl := func(args ...string) (int, string, string) {
		var out, errOut strings.Builder
		code := cli.Main(ctx, append([]string{"--server", u.d.OperatorURL}, args...), &out, &errOut)
		return code, out.String(), errOut.String()
	}
	tokenFile := filepath.Join(t.TempDir(), "join-token")
	if code, out, errOut := vtpmctl("host", "add", "worker1", "--token-file", tokenFile); code != 0 {
		t.Fatalf("host add: %d %q %q", code, out, errOut)
	}
	token, err := os.ReadFile(tokenFile)
	if err != nil {
		t.Fatal(err)
	}

	pool, err := client.LoadCAs(caFile)
	if err != nil {
		t.Fatal(err)
	}
	anon := client.New(u.d.URL, "").WithTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	e, err := anon.Enroll(ctx, api.EnrollRequest{JoinToken: strings.TrimSpace(string(token)), CSR: csr})
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(ctx, filepath.Join(dir, "vtpmd.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	_, keys, err := openKeys(ctx, Config{DataDir: dir, MasterKeyFile: filepath.Join(dir, "master.key")}, st, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	hostCAPEM := keys.hostCA.ChainPEM()
	if e.CAChain != string(hostCAPEM) {
		t.Fatalf("the chain is not the store's host CA:\n%s", e.CAChain)
	}
	block, _ := pem.Decode(hostCAPEM)
	hostCA, _ := x509.ParseCertificate(block.Bytes)
	if hostCA.Subject.CommonName != ca.HostCommonName {
		t.Fatalf("host CA subject %v", hostCA.Subject)
	}
	hostAt := func(u *daemonUnderTest) *client.Client {
		return client.New(u.d.URL, "").WithTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12,
			Certificates: []tls.Certificate{{Certificate: [][]byte{e.Certificate}, PrivateKey: key}}})
	}
	host := hostAt(u)
	if err := host.Heartbeat(ctx, api.HeartbeatRequest{Version: "v2.0.0"}); err != nil {
		t.Fatal(err)
	}
	if h, err := u.c.GetHost(ctx, "worker1"); err != nil || h.State != "up" || h.Version != "v2.0.0" || h.Certificates != 1 {
		t.Fatalf("worker1 after its heartbeat: %+v %v", h, err)
	}
	// The host certificate is no operator's.
	var ce *client.Error
	if _, err := host.Hosts(ctx); !errors.As(err, &ce) || ce.Status != 403 {
		t.Fatalf("a host certificate on the operator's route: %v", err)
	}

	// The host CA is the same after a restart; the certificate still works.
	u.stop()
	u = startConfigured(t, cfg)
	host = hostAt(u)
	if err := host.Heartbeat(ctx, api.HeartbeatRequest{Version: "v2.0.1"}); err != nil {
		t.Fatalf("heartbeat after a restart: %v", err)
	}
	if code, out, errOut := vtpmctl("host", "revoke", "worker1"); code != 0 || !strings.Contains(out, "1 certificates revoked") {
		t.Fatalf("host revoke: %d %q %q", code, out, errOut)
	}
	if err := host.Heartbeat(ctx, api.HeartbeatRequest{Version: "v3"}); !errors.As(err, &ce) || ce.Status != 401 || ce.Code != api.CodeInvalidHostCertificate {
		t.Fatalf("heartbeat after revoke: %v", err)
	}
}

// TestHostCertificateRenewal: vtpmd agent's credentials enrol once with
// the join token, kept in the data dir; a renewal, asked for with the
// current certificate, replaces key and certificate on disk and in use
// (the next handshake presents the new one); both stay valid until the
// host is revoked.
func TestHostCertificateRenewal(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	caFile, certFile, keyFile := writeTestPKI(t, dir)
	s, err := StartServer(ctx, Config{DataDir: filepath.Join(dir, "server"), Listen: "127.0.0.1:0", HostName: "control",
		TLSCert: certFile, TLSKey: keyFile}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(ctx)
	op := client.New(s.OperatorURL, "")
	tok, err := op.JoinToken(ctx, "hv1", 0)
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(tok.Token), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := Config{DataDir: filepath.Join(dir, "hv1"), HostName: "hv1", Server: s.URL, JoinTokenFile: tokenFile}
	roots, err := client.LoadCAs(caFile)
	if err != nil {
		t.Fatal(err)
	}
	trust := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	log := slog.New(slog.DiscardHandler)
	creds, err := loadHostCredentials(ctx, cfg, client.New(s.URL, "").WithTLS(trust), log)
	if err != nil {
		t.Fatal(err)
	}
	agentClient := func() *client.Client { // a new connection: a new handshake
		mtls := trust.Clone()
		mtls.GetClientCertificate = creds.get
		return client.New(s.URL, "").WithTLS(mtls)
	}
	if err := agentClient().Heartbeat(ctx, api.HeartbeatRequest{Version: "v1"}); err != nil {
		t.Fatal(err)
	}
	old := creds.cert.Load()
	if err := creds.renew(ctx, agentClient()); err != nil {
		t.Fatal(err)
	}
	renewed := creds.cert.Load()
	if renewed.Leaf.SerialNumber.Cmp(old.Leaf.SerialNumber) == 0 || renewed.Leaf.Subject.CommonName != "hv1" || renewed.Leaf.NotAfter.Before(old.Leaf.NotAfter) {
		t.Fatalf("renewed %v until %v, was %v until %v", renewed.Leaf.SerialNumber, renewed.Leaf.NotAfter, old.Leaf.SerialNumber, old.Leaf.NotAfter)
	}
	if err := agentClient().Heartbeat(ctx, api.HeartbeatRequest{Version: "v1"}); err != nil {
		t.Fatalf("a heartbeat with the renewed certificate: %v", err)
	}
	cfg.JoinTokenFile = "" // spent: the next start reads the renewed one
	again, err := loadHostCredentials(ctx, cfg, nil, log)
	if err != nil || again.cert.Load().Leaf.SerialNumber.Cmp(renewed.Leaf.SerialNumber) != 0 {
		t.Fatalf("credentials read back: %v", err)
	}
	if h, err := op.GetHost(ctx, "hv1"); err != nil || h.Certificates != 2 {
		t.Fatalf("hv1 after a renewal: %+v %v", h, err)
	}
	if _, err := op.RevokeHost(ctx, "hv1"); err != nil {
		t.Fatal(err)
	}
	for _, cert := range []*tls.Certificate{old, renewed} {
		mtls := trust.Clone()
		mtls.Certificates = []tls.Certificate{*cert}
		var ce *client.Error
		if err := client.New(s.URL, "").WithTLS(mtls).Heartbeat(ctx, api.HeartbeatRequest{}); !errors.As(err, &ce) || ce.Status != 401 {
			t.Fatalf("certificate %v after the host's revocation: %v", cert.Leaf.SerialNumber, err)
		}
	}
}
