package server

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/store"
)

// mtls is the API over HTTPS as vtpmd serves it: client certificates of
// the tenants' CA (--client-ca) and of the host CA checked if given.
type mtls struct {
	*fixture
	srv    *httptest.Server
	clock  *clock
	tenant *testCA // the deployment's --client-ca
}

func newMTLS(t *testing.T) *mtls {
	t.Helper()
	c := &clock{now: time.Now()}
	f := newFixtureWith(t, setup{now: c.Now})
	m := &mtls{fixture: f, clock: c, tenant: newTestCA(t)}
	pool := x509.NewCertPool()
	pool.AddCert(m.tenant.cert)
	pool.AddCert(f.hostCA.Certificate())
	m.srv = httptest.NewUnstartedServer(f.srv.Config.Handler)
	m.srv.TLS = &tls.Config{ClientCAs: pool, ClientAuth: tls.VerifyClientCertIfGiven, MinVersion: tls.VersionTLS12}
	m.srv.StartTLS()
	t.Cleanup(m.srv.Close)
	return m
}

// client reaches the HTTPS API with cert, or with none when it is nil.
func (m *mtls) client(cert *tls.Certificate) *http.Client {
	roots := x509.NewCertPool()
	roots.AddCert(m.srv.Certificate())
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
}

// do sends body as JSON over c and decodes the answer into out (a
// *[]byte takes it raw).
func (m *mtls) do(t *testing.T, c *http.Client, method, path string, body, out any) int {
	t.Helper()
	var r io.Reader
	if body != nil {
		data, _ := json.Marshal(body)
		if s, ok := body.(string); ok {
			data = []byte(s)
		}
		r = bytes.NewReader(data)
	}
	req, _ := http.NewRequest(method, m.srv.URL+path, r)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if raw, ok := out.(*[]byte); ok {
		*raw = data
	} else if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s: %d %s: %v", method, path, resp.StatusCode, data, err)
		}
	}
	return resp.StatusCode
}

// joinToken asks, as the operator, for a join token for host.
func (m *mtls) joinToken(t *testing.T, host, query string) api.JoinToken {
	t.Helper()
	var tok api.JoinToken
	if code := m.call(t, "POST", "/v1/hosts/"+host+"/join-tokens"+query, "", nil, &tok); code != 201 || tok.Host != host || tok.Token == "" {
		t.Fatalf("join token for %s: %d %+v", host, code, tok)
	}
	return tok
}

// enrol enrols host with a fresh P-256 key and returns its client
// certificate.
func (m *mtls) enrol(t *testing.T, host string) *tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	var e api.Enrollment
	req := api.EnrollRequest{JoinToken: m.joinToken(t, host, "").Token, CSR: makeCSR(t, key, "anything")}
	if code := m.do(t, m.client(nil), "POST", "/v1/agent/enroll", req, &e); code != 200 {
		t.Fatalf("enrol %s: %d %+v", host, code, e)
	}
	return &tls.Certificate{Certificate: [][]byte{e.Certificate}, PrivateKey: key}
}

func (m *mtls) hostNamed(t *testing.T, name string) api.Host {
	t.Helper()
	var h api.Host
	if code := m.call(t, "GET", "/v1/hosts/"+name, "", nil, &h); code != 200 {
		t.Fatalf("host %s: %d", name, code)
	}
	return h
}

func makeCSR(t *testing.T, key crypto.Signer, cn string) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn, Organization: []string{"p1"}}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// testCA is a tenants' CA (--client-ca).
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tenants CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert, key}
}

// issue makes a client certificate with subject CN cn, O org.
func (c *testCA) issue(t *testing.T, cn, org string) *tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn, Organization: []string{org}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, key.Public(), c.key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// The operator adds a host (known, down, no certificate), its agent
// enrols with a CSR and heartbeats over mTLS as the host its certificate
// names; the host is then up with that version. The token works once.
func TestEnrolThenHeartbeat(t *testing.T) {
	m := newMTLS(t)
	tok := m.joinToken(t, "new1", "")
	if want := m.clock.Now().Add(time.Hour); !tok.ExpiresAt.Equal(want.UTC()) {
		t.Errorf("expiry %v, want %v (1 h)", tok.ExpiresAt, want)
	}
	if h := m.hostNamed(t, "new1"); h.State != "down" || !h.LastHeartbeat.IsZero() || h.Certificates != 0 || h.Capacity != 0 {
		t.Fatalf("an added host before its agent spoke: %+v", h)
	}
	var raw []byte
	if m.call(t, "GET", "/v1/hosts/new1", "", nil, &raw); bytes.Contains(raw, []byte("last_heartbeat")) {
		t.Errorf("an added host whose agent never spoke shows a heartbeat: %s", raw)
	}

	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	var e api.Enrollment
	if code := m.do(t, m.client(nil), "POST", "/v1/agent/enroll", api.EnrollRequest{JoinToken: tok.Token, CSR: makeCSR(t, key, "other-host")}, &e); code != 200 {
		t.Fatalf("enrol: %d %+v", code, e)
	}
	cert, err := x509.ParseCertificate(e.Certificate)
	if err != nil {
		t.Fatal(err)
	}
	// What the CA decides, never what the CSR asked (CN other-host, O p1).
	if e.Host != "new1" || cert.Subject.CommonName != "new1" || !slices.Equal(cert.Subject.Organization, []string{ca.HostOrganization}) ||
		!slices.Equal(cert.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) || cert.IsCA ||
		!key.PublicKey.Equal(cert.PublicKey) || !cert.NotAfter.Equal(e.NotAfter) ||
		cert.NotAfter.Sub(m.clock.Now()) > ca.HostValidity || cert.NotAfter.Sub(m.clock.Now()) <= ca.HostValidity-time.Second {
		t.Fatalf("host certificate: %+v %+v", e, cert.Subject)
	}
	block, _ := pem.Decode([]byte(e.CAChain))
	if block == nil || !bytes.Equal(block.Bytes, m.hostCA.Certificate().Raw) {
		t.Fatalf("ca chain is not the host CA: %q", e.CAChain)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: m.hostCA.Pool(), CurrentTime: m.clock.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatal(err)
	}

	host := m.client(&tls.Certificate{Certificate: [][]byte{e.Certificate}, PrivateKey: key})
	if code := m.do(t, host, "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{Version: "v9.1"}, nil); code != 204 {
		t.Fatalf("heartbeat: %d", code)
	}
	if h := m.hostNamed(t, "new1"); h.State != "up" || h.Version != "v9.1" || !h.LastHeartbeat.Equal(m.clock.Now()) || h.Certificates != 1 {
		t.Fatalf("host after its heartbeat: %+v", h)
	}

	// The token again, with a fresh key: refused, as an unknown one is.
	var again, unknown []byte
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if code := m.do(t, m.client(nil), "POST", "/v1/agent/enroll", api.EnrollRequest{JoinToken: tok.Token, CSR: makeCSR(t, other, "x")}, &again); code != 401 {
		t.Fatalf("a used token: %d %s", code, again)
	}
	m.do(t, m.client(nil), "POST", "/v1/agent/enroll", api.EnrollRequest{JoinToken: strings.Repeat("A", 43), CSR: makeCSR(t, other, "x")}, &unknown)
	if !bytes.Equal(again, unknown) || !bytes.Contains(again, []byte(api.CodeInvalidJoinToken)) {
		t.Fatalf("a used token %s, an unknown one %s", again, unknown)
	}
	if h := m.hostNamed(t, "new1"); h.Certificates != 1 {
		t.Fatalf("a refused enrolment issued a certificate: %+v", h)
	}
	var evs []store.Event
	if err := m.store.View(context.Background(), func(tx *store.Tx) (err error) { evs, err = tx.ListAllEvents(store.HostKey("new1")); return err }); err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, ev := range evs {
		actions = append(actions, ev.Action)
	}
	if !slices.Equal(actions, []string{"added", "join token issued", "enrolled"}) {
		t.Errorf("host events: %v", actions)
	}
}

// Racing enrolments with one token: exactly one gets a certificate.
func TestJoinTokenRace(t *testing.T) {
	m := newMTLS(t)
	tok := m.joinToken(t, "race", "")
	const n = 8
	codes := make(chan int, n)
	var wg sync.WaitGroup
	for range n {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		csr := makeCSR(t, key, "race")
		body, _ := json.Marshal(api.EnrollRequest{JoinToken: tok.Token, CSR: csr})
		wg.Go(func() {
			resp, err := m.client(nil).Post(m.srv.URL+"/v1/agent/enroll", "application/json", bytes.NewReader(body))
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			codes <- resp.StatusCode
		})
	}
	wg.Wait()
	close(codes)
	count := map[int]int{}
	for c := range codes {
		count[c]++
	}
	if count[200] != 1 || count[401] != n-1 {
		t.Fatalf("answers to %d racing enrolments: %v", n, count)
	}
	if h := m.hostNamed(t, "race"); h.Certificates != 1 {
		t.Fatalf("certificates after the race: %+v", h)
	}
}

// An expired token is refused with the same answer as an unknown one;
// bad requests for tokens are refused and add no host.
func TestJoinTokenExpiryAndBounds(t *testing.T) {
	m := newMTLS(t)
	tok := m.joinToken(t, "h2", "?ttl=1m")
	if !tok.ExpiresAt.Equal(m.clock.Now().Add(time.Minute).UTC()) {
		t.Fatalf("ttl=1m: %+v", tok)
	}
	m.clock.advance(time.Minute)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	var expired, unknown []byte
	if code := m.do(t, m.client(nil), "POST", "/v1/agent/enroll", api.EnrollRequest{JoinToken: tok.Token, CSR: makeCSR(t, key, "h2")}, &expired); code != 401 {
		t.Fatalf("an expired token: %d %s", code, expired)
	}
	m.do(t, m.client(nil), "POST", "/v1/agent/enroll", api.EnrollRequest{JoinToken: "nope", CSR: makeCSR(t, key, "h2")}, &unknown)
	if !bytes.Equal(expired, unknown) {
		t.Fatalf("an expired token %s, an unknown one %s", expired, unknown)
	}

	for _, c := range []struct {
		path, project string
		status        int
		code          api.Code
	}{
		{"/v1/hosts/h3/join-tokens?ttl=59s", "", 400, api.CodeInvalidParameter},
		{"/v1/hosts/h3/join-tokens?ttl=25h", "", 400, api.CodeInvalidParameter},
		{"/v1/hosts/h3/join-tokens?ttl=-1h", "", 400, api.CodeInvalidParameter},
		{"/v1/hosts/h3/join-tokens?ttl=soon", "", 400, api.CodeInvalidParameter},
		{"/v1/hosts/-h3/join-tokens", "", 400, api.CodeInvalidHostName},
		{"/v1/hosts/" + strings.Repeat("h", 64) + "/join-tokens", "", 400, api.CodeInvalidHostName},
		{"/v1/hosts/h3/join-tokens", "p1", 403, api.CodeForbidden},
	} {
		var e api.ErrorBody
		if code := m.call(t, "POST", c.path, c.project, nil, &e); code != c.status || e.Error.Code != c.code {
			t.Errorf("POST %s as %q: %d %+v", c.path, c.project, code, e)
		}
	}
	var hosts api.HostList
	m.call(t, "GET", "/v1/hosts", "", nil, &hosts)
	if len(hosts.Items) != 2 { // h1 of the fixture, h2
		t.Errorf("refused token requests added hosts: %+v", hosts.Items)
	}
}

// A CSR that does not parse, is not signed by its key, or has a weak key
// is refused (400 invalid_csr) and leaves the token usable.
func TestEnrolRefusesBadCSRs(t *testing.T) {
	m := newMTLS(t)
	tok := m.joinToken(t, "h4", "")
	good, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	forged := makeCSR(t, good, "h4")
	forged[len(forged)-3] ^= 0xff // in the signature
	weakRSA, _ := rsa.GenerateKey(rand.Reader, 1024)
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	for name, csr := range map[string][]byte{
		"garbage":        []byte("not a csr"),
		"none":           nil,
		"bad signature":  forged,
		"RSA-1024":       makeCSR(t, weakRSA, "h4"),
		"P-224":          makeCSR(t, p224, "h4"),
		"trailing bytes": append(makeCSR(t, good, "h4"), 0),
	} {
		var e api.ErrorBody
		if code := m.do(t, m.client(nil), "POST", "/v1/agent/enroll", api.EnrollRequest{JoinToken: tok.Token, CSR: csr}, &e); code != 400 || e.Error.Code != api.CodeInvalidCSR {
			t.Errorf("%s: %d %+v", name, code, e)
		}
	}
	for name, body := range map[string]any{
		"no token":      api.EnrollRequest{CSR: makeCSR(t, good, "h4")},
		"unknown field": `{"join_token":"` + tok.Token + `","csr":"","host":"h1"}`,
		"not json":      `{`,
	} {
		var e api.ErrorBody
		if code := m.do(t, m.client(nil), "POST", "/v1/agent/enroll", body, &e); code != 400 || (e.Error.Code != api.CodeInvalidParameter && e.Error.Code != api.CodeInvalidJSON) {
			t.Errorf("%s: %d %+v", name, code, e)
		}
	}
	if h := m.hostNamed(t, "h4"); h.Certificates != 0 {
		t.Fatalf("refused enrolments issued certificates: %+v", h)
	}
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	if code := m.do(t, m.client(nil), "POST", "/v1/agent/enroll", api.EnrollRequest{JoinToken: tok.Token, CSR: makeCSR(t, rsaKey, "h4")}, nil); code != 200 {
		t.Fatalf("the token after refused CSRs, with an RSA-2048 key: %d", code)
	}
}

// Revoking a host stops its certificate at the next request and deletes
// its unused join tokens, though the server, having found the certificate
// honoured, does not read it again for the next requests (enrol.HonourFor).
func TestRevokeHost(t *testing.T) {
	m := newMTLS(t)
	host := m.client(m.enrol(t, "h5"))
	if code := m.do(t, host, "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{Version: "1"}, nil); code != 204 {
		t.Fatalf("heartbeat: %d", code)
	}
	before := m.store.Statements()
	if code := m.do(t, host, "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{Version: "1"}, nil); code != 204 {
		t.Fatalf("heartbeat: %d", code)
	}
	if n := m.store.Statements() - before; n != 1 {
		t.Fatalf("a heartbeat with a certificate found honoured ran %d statements, want 1 (the heartbeat's)", n)
	}
	unused := m.joinToken(t, "h5", "")
	var e api.ErrorBody
	if code := m.call(t, "POST", "/v1/hosts/h5/revoke", "p1", nil, &e); code != 403 {
		t.Fatalf("a project revoking: %d %+v", code, e)
	}
	var rev api.HostRevocation
	if code := m.call(t, "POST", "/v1/hosts/h5/revoke", "", nil, &rev); code != 200 || rev != (api.HostRevocation{Host: "h5", Certificates: 1, JoinTokens: 1}) {
		t.Fatalf("revoke: %d %+v", code, rev)
	}
	// The same connection, at once.
	if code := m.do(t, host, "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{Version: "2"}, &e); code != 401 || e.Error.Code != api.CodeInvalidHostCertificate {
		t.Fatalf("heartbeat after revoke: %d %+v", code, e)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if code := m.do(t, m.client(nil), "POST", "/v1/agent/enroll", api.EnrollRequest{JoinToken: unused.Token, CSR: makeCSR(t, key, "h5")}, &e); code != 401 || e.Error.Code != api.CodeInvalidJoinToken {
		t.Fatalf("a token of a revoked host: %d %+v", code, e)
	}
	if h := m.hostNamed(t, "h5"); h.Version != "1" || h.Certificates != 0 {
		t.Fatalf("host after revoke: %+v", h)
	}
	if code := m.call(t, "POST", "/v1/hosts/nope/revoke", "", nil, &e); code != 404 {
		t.Fatalf("revoking an unknown host: %d %+v", code, e)
	}
	// Enrolling again with a new token works.
	if code := m.do(t, m.client(m.enrol(t, "h5")), "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{Version: "3"}, nil); code != 204 {
		t.Fatalf("heartbeat after enrolling again: %d", code)
	}
}

// A host certificate found honoured is not verified again on each request
// (enrol.HonourFor), but that holds for that very certificate only, and
// not past its expiry: a certificate of the tenants' CA with its serial
// and subject is refused, and so is the host certificate a second after
// it expired, though honoured a second before.
func TestHonouredCertificateIsThatOne(t *testing.T) {
	m := newMTLS(t)
	cert := m.enrol(t, "h8")
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	host := m.client(cert)
	if code := m.do(t, host, "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{Version: "1"}, nil); code != 204 {
		t.Fatalf("heartbeat: %d", code)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: leaf.SerialNumber, Subject: leaf.Subject, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, m.tenant.cert, key.Public(), m.tenant.key)
	if err != nil {
		t.Fatal(err)
	}
	twin := m.client(&tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key})
	var e api.ErrorBody
	if code := m.do(t, twin, "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{Version: "2"}, &e); code != 403 {
		t.Fatalf("the tenants' CA's certificate with the host certificate's serial and subject: %d %+v", code, e)
	}
	m.clock.advance(leaf.NotAfter.Sub(m.clock.Now()) - time.Second)
	if code := m.do(t, host, "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{Version: "3"}, nil); code != 204 {
		t.Fatalf("heartbeat a second before the certificate expires: %d", code)
	}
	m.clock.advance(2 * time.Second)
	if code := m.do(t, host, "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{Version: "4"}, &e); code != 403 {
		t.Fatalf("heartbeat a second after the certificate expired: %d %+v", code, e)
	}
	if h := m.hostNamed(t, "h8"); h.Version != "3" {
		t.Fatalf("host after the refused heartbeats: %+v", h)
	}
}

// Host certificates open hosts' routes alone, and tenants' and the
// operator's certificates never open hosts' routes, even one the tenants'
// CA made to look like a host's.
func TestHostAndTenantCertificatesStayApart(t *testing.T) {
	m := newMTLS(t)
	host := m.client(m.enrol(t, "h6"))
	tenant := m.client(m.tenant.issue(t, "alice", "p1"))
	operator := m.client(m.tenant.issue(t, "ops", OperatorOrganization))
	lookalike := m.client(m.tenant.issue(t, "h6", "system:host"))

	if code := m.do(t, tenant, "GET", "/v1/vtpms", nil, nil); code != 200 {
		t.Fatalf("a tenant's certificate on a tenant's route: %d", code)
	}
	if code := m.do(t, operator, "GET", "/v1/hosts", nil, nil); code != 200 {
		t.Fatalf("the operator's certificate on the operator's route: %d", code)
	}
	for _, c := range []struct {
		who          string
		client       *http.Client
		method, path string
		body         any
		status       int
	}{
		{"host", host, "GET", "/v1/vtpms", nil, 403},
		{"host", host, "GET", "/v1/hosts", nil, 403},
		{"host", host, "POST", "/v1/hosts/h6/join-tokens", nil, 403},
		{"tenant", tenant, "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{}, 403},
		{"operator", operator, "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{}, 403},
		{"lookalike", lookalike, "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{}, 403},
		{"nobody", m.client(nil), "POST", "/v1/agent/heartbeat", api.HeartbeatRequest{}, 401},
	} {
		var e api.ErrorBody
		if code := m.do(t, c.client, c.method, c.path, c.body, &e); code != c.status {
			t.Errorf("%s: %s %s: %d %+v", c.who, c.method, c.path, code, e)
		}
	}
	// The operator's socket is no host either.
	if code := m.call(t, "POST", "/v1/agent/heartbeat", "", api.HeartbeatRequest{}, nil); code != 401 {
		t.Errorf("heartbeat on the operator's socket: %d", code)
	}
	if h := m.hostNamed(t, "h6"); !h.LastHeartbeat.IsZero() {
		t.Errorf("a refused heartbeat was recorded: %+v", h)
	}
}

// A heartbeat's bad body is refused and records nothing.
func TestHeartbeatRefusesBadInput(t *testing.T) {
	m := newMTLS(t)
	host := m.client(m.enrol(t, "h7"))
	for name, body := range map[string]any{
		"long version":  api.HeartbeatRequest{Version: strings.Repeat("v", 129)},
		"unknown field": `{"version":"1","host":"h1"}`,
		"not json":      `[`,
	} {
		var e api.ErrorBody
		if code := m.do(t, host, "POST", "/v1/agent/heartbeat", body, &e); code != 400 || (e.Error.Code != api.CodeInvalidParameter && e.Error.Code != api.CodeInvalidJSON) {
			t.Errorf("%s: %d %+v", name, code, e)
		}
	}
	for _, name := range []string{"h1", "h7"} {
		if h := m.hostNamed(t, name); name == "h7" && !h.LastHeartbeat.IsZero() {
			t.Errorf("%s after refused heartbeats: %+v", name, h)
		}
	}
}
