package daemon

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cli"
)

// TestTLS serves the API over HTTPS with a certificate from a private CA:
// clients that trust the CA (vtpmctl --ca-file, the host agent in the same
// process) get through; plain HTTP and clients that do not trust it fail.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	caFile, certFile, keyFile := writeTestPKI(t, dir)
	th := newTestHost(t, dir, "host kernel 6.1")
	u := startConfigured(t, th.attests(Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "tls-host", TLSCert: certFile, TLSKey: keyFile}))
	ctx := context.Background()
	if !strings.HasPrefix(u.d.URL, "https://") {
		t.Fatalf("URL %s", u.d.URL)
	}

	pool, err := client.LoadCAs(caFile)
	if err != nil {
		t.Fatal(err)
	}
	trusting := client.New(u.d.URL, "").WithTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	if hosts, err := trusting.Hosts(ctx); err != nil || len(hosts.Items) != 1 {
		t.Fatalf("a client trusting the CA: %v %v", hosts, err)
	}
	if _, err := client.New(u.d.URL, "").Hosts(ctx); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a client not trusting the CA: %v", err)
	}
	if _, err := client.New("http://"+u.d.Addr, "").Hosts(ctx); err == nil {
		t.Fatal("plain HTTP to the HTTPS API: no error")
	}
	// The host agent reaches the API over loopback HTTPS.
	if h, err := u.d.AttestHost(ctx); err != nil || h.State != "registered" {
		t.Fatalf("host attestation over HTTPS: %+v %v", h, err)
	}

	var out, errOut bytes.Buffer
	if code := cli.Main(ctx, []string{"--server", u.d.URL, "--ca-file", caFile, "hosts"}, &out, &errOut); code != 0 || !strings.Contains(out.String(), "tls-host") {
		t.Fatalf("vtpmctl --ca-file: %d %q %q", code, out.String(), errOut.String())
	}
	if code := cli.Main(ctx, []string{"--server", u.d.URL, "--ca-file", filepath.Join(dir, "nope.pem"), "hosts"}, &out, &errOut); code != cli.ExitUsage {
		t.Fatalf("vtpmctl with a missing CA file: %d", code)
	}

	// A key that is not the certificate's is refused at start-up.
	_, otherKey, _ := writeTestPKI(t, t.TempDir())
	if _, err := StartAllInOne(ctx, Config{DataDir: t.TempDir(), Listen: "127.0.0.1:0", TLSCert: certFile, TLSKey: otherKey}, nil); err == nil || !strings.Contains(err.Error(), "TLS") {
		t.Fatalf("mismatched TLS key: %v", err)
	}
}

// writeTestPKI makes a CA and a server certificate for localhost and
// 127.0.0.1, as PEM files in dir: the CA, the certificate, its key.
func writeTestPKI(t *testing.T, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test API CA"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "localhost"}, DNSNames: []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	caFile, certFile, keyFile = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "api.pem"), filepath.Join(dir, "api.key")
	for path, block := range map[string]*pem.Block{caFile: {Type: "CERTIFICATE", Bytes: caDER}, certFile: {Type: "CERTIFICATE", Bytes: der},
		keyFile: {Type: "PRIVATE KEY", Bytes: keyDER}} {
		if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return caFile, certFile, keyFile
}
