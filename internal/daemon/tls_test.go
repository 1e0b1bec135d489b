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
	"encoding/binary"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cli"
	"github.com/vtpmd/vtpmd/internal/server"
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
	if chain, err := trusting.CA(ctx); err != nil || !bytes.Contains(chain, []byte("BEGIN CERTIFICATE")) {
		t.Fatalf("a client trusting the CA: %q %v", chain, err)
	}
	// Without a client certificate it is nobody: only public and agents'
	// routes answer it.
	var e *client.Error
	if _, err := trusting.Hosts(ctx); !errors.As(err, &e) || e.Status != 401 {
		t.Fatalf("a tenant's route without a client certificate: %v", err)
	}
	if _, err := client.New(u.d.URL, "").CA(ctx); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a client not trusting the CA: %v", err)
	}
	if _, err := client.New("http://"+u.d.Addr, "").CA(ctx); err == nil {
		t.Fatal("plain HTTP to the HTTPS API: no error")
	}
	// The host agent reaches the API over loopback HTTPS.
	if h, err := u.d.AttestHost(ctx); err != nil || h.State != "registered" {
		t.Fatalf("host attestation over HTTPS: %+v %v", h, err)
	}

	var out, errOut bytes.Buffer
	if code := cli.Main(ctx, []string{"--server", u.d.URL, "--ca-file", caFile, "ca"}, &out, &errOut); code != 0 || !strings.Contains(out.String(), "BEGIN CERTIFICATE") {
		t.Fatalf("vtpmctl --ca-file: %d %q %q", code, out.String(), errOut.String())
	}
	if code := cli.Main(ctx, []string{"--server", u.d.URL, "--ca-file", filepath.Join(dir, "nope.pem"), "ca"}, &out, &errOut); code != cli.ExitUsage {
		t.Fatalf("vtpmctl with a missing CA file: %d", code)
	}

	// A key that is not the certificate's is refused at start-up.
	_, otherKey, _ := writeTestPKI(t, t.TempDir())
	if _, err := StartAllInOne(ctx, Config{DataDir: t.TempDir(), Listen: "127.0.0.1:0", TLSCert: certFile, TLSKey: otherKey}, nil); err == nil || !strings.Contains(err.Error(), "TLS") {
		t.Fatalf("mismatched TLS key: %v", err)
	}
}

// A renewed certificate is served without a restart, to outside clients
// and to this process's own; a renewal that does not load keeps the last
// good one.
func TestTLSRenewal(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, dir)
	certFile, keyFile := ca.issue(t, "api", pkix.Name{CommonName: "localhost"})
	th := newTestHost(t, dir, "host kernel 6.1")
	u := startConfigured(t, th.attests(Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "tls-host", TLSCert: certFile, TLSKey: keyFile}))
	ctx := context.Background()
	pool, err := client.LoadCAs(ca.file)
	if err != nil {
		t.Fatal(err)
	}
	served := func() *x509.Certificate {
		t.Helper()
		conn, err := tls.Dial("tcp", u.d.Addr, &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0]
	}
	first := served()

	// Renew: a new key and certificate over the old files.
	renewed, renewedKey := ca.issue(t, "renewed", pkix.Name{CommonName: "localhost"})
	for _, f := range [][2]string{{renewed, certFile}, {renewedKey, keyFile}} {
		if err := os.Rename(f[0], f[1]); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for served().SerialNumber.Cmp(first.SerialNumber) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the renewed certificate is not served")
		}
		time.Sleep(200 * time.Millisecond)
	}
	second := served()
	if h, err := u.d.AttestHost(ctx); err != nil || h.State != "registered" {
		t.Fatalf("this process's own client after the renewal: %+v %v", h, err)
	}

	// A certificate whose key is not yet written does not load: the
	// renewed one stays.
	third, _ := ca.issue(t, "third", pkix.Name{CommonName: "localhost"})
	if err := os.Rename(third, certFile); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	if got := served(); got.SerialNumber.Cmp(second.SerialNumber) != 0 {
		t.Fatalf("a pair that does not load replaced the served certificate: serial %v", got.SerialNumber)
	}
	if h, err := u.d.AttestHost(ctx); err != nil || h.State != "registered" {
		t.Fatalf("this process's own client with a bad renewal on disk: %+v %v", h, err)
	}
}

// A rotated --client-ca bundle takes effect without a restart: a CA
// added is trusted, a CA removed is not, and a bundle that does not load
// keeps the last good one.
func TestClientCARotation(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, dir)
	certFile, keyFile := ca.issue(t, "api", pkix.Name{CommonName: "localhost"})
	th := newTestHost(t, dir, "host kernel 6.1")
	u := startConfigured(t, th.attests(Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "rotation-host",
		TLSCert: certFile, TLSKey: keyFile, ClientCA: ca.file}))
	ctx := context.Background()
	pool, err := client.LoadCAs(ca.file)
	if err != nil {
		t.Fatal(err)
	}
	operator := func(ca *testCA, name string) func() error {
		c, k := ca.issue(t, name, pkix.Name{CommonName: name, Organization: []string{server.OperatorOrganization}})
		pair, err := tls.LoadX509KeyPair(c, k)
		if err != nil {
			t.Fatal(err)
		}
		return func() error { // a fresh connection each time
			_, err := client.New(u.d.URL, "").WithTLS(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}}).Hosts(ctx)
			return err
		}
	}
	next := newTestCA(t, t.TempDir())
	old, rotated := operator(ca, "ops-old"), operator(next, "ops-new")
	if err := old(); err != nil {
		t.Fatalf("the first CA's operator: %v", err)
	}
	if rotated() == nil {
		t.Fatal("a CA not in the bundle yet was trusted")
	}
	oldPEM, _ := os.ReadFile(ca.file)
	nextPEM, _ := os.ReadFile(next.file)
	replace := func(content []byte) {
		t.Helper()
		tmp := ca.file + ".new"
		if err := os.WriteFile(tmp, content, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, ca.file); err != nil {
			t.Fatal(err)
		}
	}
	eventually := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !ok(); time.Sleep(200 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal(what)
			}
		}
	}

	replace(append(oldPEM, nextPEM...))
	eventually("the added CA is not trusted", func() bool { return rotated() == nil })
	if err := old(); err != nil {
		t.Fatalf("the first CA's operator with both CAs: %v", err)
	}
	replace([]byte("half a bundle\n-----BEGIN CERT"))
	time.Sleep(1500 * time.Millisecond)
	if err, err2 := old(), rotated(); err != nil || err2 != nil {
		t.Fatalf("a bundle that does not load replaced the CAs: %v, %v", err, err2)
	}
	replace(nextPEM)
	eventually("the removed CA is still trusted", func() bool { return old() != nil })
	if err := rotated(); err != nil {
		t.Fatalf("the remaining CA's operator: %v", err)
	}
	// The host agent's certificate-free attestation is not affected.
	if h, err := u.d.AttestHost(ctx); err != nil || h.State != "registered" {
		t.Fatalf("host attestation after the rotation: %+v %v", h, err)
	}
}

// writeTestPKI makes a CA and a server certificate for localhost and
// 127.0.0.1, as PEM files in dir: the CA, the certificate, its key.
func writeTestPKI(t testing.TB, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	ca := newTestCA(t, dir)
	certFile, keyFile = ca.issue(t, "api", pkix.Name{CommonName: "localhost"})
	return ca.file, certFile, keyFile
}

// testCA issues certificates as PEM files in its directory.
type testCA struct {
	dir  string
	file string // the CA certificate
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t testing.TB, dir string) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ca := &testCA{dir: dir, file: filepath.Join(dir, "ca.pem"), cert: cert, key: key}
	writePEM(t, ca.file, "CERTIFICATE", der)
	return ca
}

// issue writes a certificate for subject, good for a server on localhost,
// 127.0.0.1 and 10.0.2.2 (the host as QEMU user networking shows it to a
// test guest, which reaches the server there) and for a client, and its
// key: name.pem, name.key.
func (ca *testCA) issue(t testing.TB, name string, subject pkix.Name) (certFile, keyFile string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: subject, DNSNames: []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv4(10, 0, 2, 2)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		KeyUsage: x509.KeyUsageDigitalSignature, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	certFile, keyFile = filepath.Join(ca.dir, name+".pem"), filepath.Join(ca.dir, name+".key")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", keyDER)
	return certFile, keyFile
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestClientCertificates: with --client-ca, tenants and the operator are
// who their client certificates say (the subject's organization is the
// project), X-Project-ID cannot widen that, and agents, which have no
// certificates, still attest.
func TestClientCertificates(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, dir)
	certFile, keyFile := ca.issue(t, "api", pkix.Name{CommonName: "localhost"})
	th := newTestHost(t, dir, "host kernel 6.1")
	u := startConfigured(t, th.attests(Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "mtls-host",
		TLSCert: certFile, TLSKey: keyFile, ClientCA: ca.file}))
	ctx := context.Background()
	pool, err := client.LoadCAs(ca.file)
	if err != nil {
		t.Fatal(err)
	}
	as := func(project string, subject *pkix.Name) *client.Client {
		cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		if subject != nil {
			c, k := ca.issue(t, subject.CommonName, *subject)
			pair, err := tls.LoadX509KeyPair(c, k)
			if err != nil {
				t.Fatal(err)
			}
			cfg.Certificates = []tls.Certificate{pair}
		}
		return client.New(u.d.URL, project).WithTLS(cfg)
	}
	operator := as("", &pkix.Name{CommonName: "ops", Organization: []string{server.OperatorOrganization}})
	alice := as("", &pkix.Name{CommonName: "alice", Organization: []string{"p1"}})
	bob := as("", &pkix.Name{CommonName: "bob", Organization: []string{"p2"}})
	status := func(err error) int {
		var e *client.Error
		if errors.As(err, &e) {
			return e.Status
		}
		return 0
	}

	if _, err := as("", nil).Hosts(ctx); status(err) != 401 {
		t.Fatalf("no certificate: %v", err)
	}
	if _, err := as("p1", nil).List(ctx, client.ListOptions{}); status(err) != 401 {
		t.Fatalf("no certificate, only X-Project-ID: %v", err)
	}
	if _, err := as("", &pkix.Name{CommonName: "nobody"}).Hosts(ctx); status(err) != 403 {
		t.Fatalf("a certificate naming no project: %v", err)
	}
	other := newTestCA(t, t.TempDir())
	c, k := other.issue(t, "mallory", pkix.Name{CommonName: "mallory", Organization: []string{server.OperatorOrganization}})
	pair, _ := tls.LoadX509KeyPair(c, k)
	if _, err := client.New(u.d.URL, "").WithTLS(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}}).Hosts(ctx); err == nil {
		t.Fatal("a certificate from another CA was accepted")
	}

	id := "6f1f3c52-8c8e-4b7e-9d3a-2f5e8f0c1a22"
	if _, err := operator.Create(ctx, api.CreateVTPMRequest{InstanceID: id, Project: "p1",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}}); err != nil {
		t.Fatalf("the operator creating for p1: %v", err)
	}
	if v, err := alice.Get(ctx, id); err != nil || v.Project != "p1" {
		t.Fatalf("p1 reading its own vTPM: %+v %v", v, err)
	}
	if _, err := alice.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	// The event log names who did what: the certificate's holder too.
	evs, err := alice.Events(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	actors := map[string]string{}
	for _, e := range evs.Items {
		actors[e.Action] = e.Actor
	}
	if actors["created"] != `api:operator ("ops")` || actors["stop requested"] != `api:project:p1 ("alice")` {
		t.Fatalf("who did what: %v", actors)
	}
	if _, err := bob.Get(ctx, id); status(err) != 404 {
		t.Fatalf("p2 reading p1's vTPM: %v", err)
	}
	if l, err := bob.List(ctx, client.ListOptions{}); err != nil || len(l.Items) != 0 {
		t.Fatalf("p2's list: %+v %v", l, err)
	}
	bobAsP1 := as("p1", &pkix.Name{CommonName: "bob", Organization: []string{"p2"}})
	if _, err := bobAsP1.Get(ctx, id); status(err) != 403 {
		t.Fatalf("p2's certificate with X-Project-ID p1: %v", err)
	}
	if _, err := bob.Create(ctx, api.CreateVTPMRequest{InstanceID: "7a2b4c6d-1e3f-4a5b-8c7d-9e0f1a2b3c4d", Project: "p1",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}}); status(err) != 403 {
		t.Fatalf("p2 creating a vTPM for p1: %v", err)
	}
	// Hosts are the operator's: a project sees its instance's host in the
	// vTPM record only.
	if _, err := alice.Hosts(ctx); status(err) != 403 {
		t.Fatalf("p1 listing hosts: %v", err)
	}
	if _, err := operator.Hosts(ctx); err != nil {
		t.Fatalf("the operator listing hosts: %v", err)
	}

	// Metrics are the operator's; health and the CA are anyone's.
	get := func(c *tls.Config, path string) int {
		resp, err := (&http.Client{Transport: &http.Transport{TLSClientConfig: c}}).Get(u.d.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	trustOnly := &tls.Config{RootCAs: pool}
	aliceCert, aliceKey := ca.issue(t, "alice2", pkix.Name{CommonName: "alice", Organization: []string{"p1"}})
	opCert, opKey := ca.issue(t, "ops2", pkix.Name{CommonName: "ops", Organization: []string{server.OperatorOrganization}})
	withCert := func(c, k string) *tls.Config {
		pair, _ := tls.LoadX509KeyPair(c, k)
		return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}}
	}
	for _, c := range []struct {
		cfg  *tls.Config
		path string
		want int
	}{
		{trustOnly, "/healthz", 200}, {trustOnly, "/v1/ca", 200}, {trustOnly, "/metrics", 401},
		{withCert(aliceCert, aliceKey), "/metrics", 403}, {withCert(opCert, opKey), "/metrics", 200},
	} {
		if got := get(c.cfg, c.path); got != c.want {
			t.Errorf("GET %s: %d, want %d", c.path, got, c.want)
		}
	}

	// The host agent in this process has no certificate: it attests with
	// its tokens, as a guest's agent does.
	if h, err := u.d.AttestHost(ctx); err != nil || h.State != "registered" {
		t.Fatalf("host attestation with client certificates required: %+v %v", h, err)
	}

	var out, errOut bytes.Buffer
	if code := cli.Main(ctx, []string{"--server", u.d.URL, "--ca-file", ca.file, "--cert", aliceCert, "--key", aliceKey, "list"}, &out, &errOut); code != 0 || !strings.Contains(out.String(), id) {
		t.Fatalf("vtpmctl --cert: %d %q %q", code, out.String(), errOut.String())
	}
	if code := cli.Main(ctx, []string{"--server", u.d.URL, "--ca-file", ca.file, "--cert", aliceCert, "list"}, &out, &errOut); code != cli.ExitUsage {
		t.Fatalf("vtpmctl --cert without --key: %d", code)
	}

	if _, err := StartAllInOne(ctx, Config{DataDir: t.TempDir(), Listen: "127.0.0.1:0", ClientCA: ca.file}, nil); err == nil || !strings.Contains(err.Error(), "need TLS") {
		t.Fatalf("client CAs without TLS: %v", err)
	}
}

// TestAPIHTTP2Settings: the API's HTTP/2 settings bound what each of many
// long-lived connections keeps: header compression tables of 512 bytes,
// frames of at most 16 KiB.
func TestAPIHTTP2Settings(t *testing.T) {
	dir := t.TempDir()
	_, certFile, keyFile := writeTestPKI(t, dir)
	s, err := openServer(context.Background(), Config{DataDir: filepath.Join(dir, "data"), Listen: "127.0.0.1:0", TLSCert: certFile, TLSKey: keyFile}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.serve()
	t.Cleanup(func() { s.Shutdown(context.Background()) })

	cfg := s.self.Clone()
	cfg.NextProtos = []string{"h2"}
	conn, err := tls.Dial("tcp", s.Addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if p := conn.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("negotiated %q", p)
	}
	// The client's preface and an empty SETTINGS frame; the server's
	// first frame is its SETTINGS (RFC 9113 section 3.4).
	if _, err := io.WriteString(conn, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(time.Minute))
	var hdr [9]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		t.Fatal(err)
	}
	if hdr[3] != 0x4 || hdr[4] != 0 {
		t.Fatalf("first frame: type %d flags %d, want SETTINGS", hdr[3], hdr[4])
	}
	payload := make([]byte, int(hdr[0])<<16|int(hdr[1])<<8|int(hdr[2]))
	if _, err := io.ReadFull(conn, payload); err != nil {
		t.Fatal(err)
	}
	settings := map[uint16]uint32{}
	for p := payload; len(p) >= 6; p = p[6:] {
		settings[binary.BigEndian.Uint16(p)] = binary.BigEndian.Uint32(p[2:])
	}
	const headerTableSize, maxFrameSize = 0x1, 0x5 // RFC 9113 section 6.5.2
	if settings[headerTableSize] != 512 || settings[maxFrameSize] != 16<<10 {
		t.Fatalf("SETTINGS %v: want HEADER_TABLE_SIZE 512, MAX_FRAME_SIZE 16384", settings)
	}
}

// TestOperatorProfiles: the operator's socket serves Go's profiles; the
// network address does not.
func TestOperatorProfiles(t *testing.T) {
	dir := t.TempDir()
	s, err := openServer(context.Background(), Config{DataDir: filepath.Join(dir, "data"), Listen: "127.0.0.1:0"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.serve()
	t.Cleanup(func() { s.Shutdown(context.Background()) })
	local := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", s.cfg.APISocket)
	}}}
	for u, want := range map[string]int{"http://vtpmd/debug/pprof/heap?gc=1": http.StatusOK, s.URL + "/debug/pprof/heap": http.StatusNotFound} {
		c := local
		if strings.HasPrefix(u, s.URL) {
			c = http.DefaultClient
		}
		resp, err := c.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s: %s, want %d", u, resp.Status, want)
		}
	}
}
