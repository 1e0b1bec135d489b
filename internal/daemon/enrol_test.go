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
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/cli"
)

// TestHostEnrolment: with TLS (and no --client-ca), a host added with
// vtpmctl host add enrols over HTTPS with a CSR made here, heartbeats with
// its host certificate and reads up with its version; after vtpmctl host
// revoke its next heartbeat is refused. The host CA lives in the data dir
// with its key in the key manager, and survives a restart.
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
	hostCAPEM, err := os.ReadFile(filepath.Join(dir, "host-ca", "ca.pem"))
	if err != nil || e.CAChain != string(hostCAPEM) {
		t.Fatalf("the chain is not <data-dir>/host-ca/ca.pem: %v", err)
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
