package keystone

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// counting is a transport that counts the requests it carries to the real
// Keystone, by method.
type counting struct {
	gets, posts atomic.Int64
}

func (c *counting) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method == http.MethodPost {
		c.posts.Add(1)
	} else {
		c.gets.Add(1)
	}
	return http.DefaultTransport.RoundTrip(r)
}

// Sessions authenticate with each kind of clouds.yaml entry (password with
// project or system scope, a token), find the catalog's key-manager, and
// say plainly why not.
func TestSessionAgainstKeystone(t *testing.T) {
	ctx := context.Background()
	a := keystoneCloud(t, "vtpmd-a")
	s := NewSession(a, nil)
	tok, err := s.Token(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := s.ProjectID(ctx)
	if err != nil || pid == "" {
		t.Fatalf("project id: %q %v", pid, err)
	}
	if ep, err := s.Endpoint(ctx, "key-manager"); err != nil || !strings.HasPrefix(ep, "http://127.0.0.1:9311") {
		t.Errorf("key-manager endpoint: %q %v", ep, err)
	}
	if _, err := s.Endpoint(ctx, "no-such-service"); !errors.Is(err, ErrNoEndpoint) {
		t.Errorf("no such service: %v", err)
	}
	other := a
	other.RegionName = "NoSuchRegion"
	if _, err := NewSession(other, nil).Endpoint(ctx, "key-manager"); !errors.Is(err, ErrNoEndpoint) {
		t.Errorf("another region: %v", err)
	}

	// The token method, rescoped to the same project.
	byToken := NewSession(Credentials{AuthURL: a.AuthURL, Token: tok, ProjectID: pid}, nil)
	if p, err := byToken.ProjectID(ctx); err != nil || p != pid {
		t.Errorf("token method: %q %v", p, err)
	}
	system := NewSession(keystoneCloud(t, "admin-system"), nil)
	if _, err := system.ProjectID(ctx); !errors.Is(err, ErrNotProjectScoped) {
		t.Errorf("system scope's project: %v", err)
	}
	info, err := NewSession(keystoneCloud(t, "vtpmd"), nil).Validate(ctx, mustToken(t, system))
	if err != nil || !info.System || !info.HasRole("admin") || info.Catalog != nil {
		t.Errorf("a system token validated: %+v %v", info, err)
	}

	bad := a
	bad.Password = "not-the-password"
	if _, err := NewSession(bad, nil).Token(ctx); !errors.Is(err, ErrBadCredentials) || strings.Contains(err.Error(), bad.Password) {
		t.Errorf("a wrong password: %v", err)
	}
	down := a
	down.AuthURL = "http://127.0.0.1:1/v3"
	if _, err := NewSession(down, nil).Token(ctx); !errors.Is(err, ErrUnavailable) {
		t.Errorf("keystone unreachable: %v", err)
	}
	if _, err := NewSession(Credentials{AuthURL: a.AuthURL, Username: "x"}, nil).Token(ctx); !errors.Is(err, ErrIncomplete) {
		t.Errorf("no password: %v", err)
	}
}

func mustToken(t *testing.T, s *Session) string {
	t.Helper()
	tok, err := s.Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// Concurrent callers share one token request; the token is renewed once
// it is due (the clock moved), not before.
func TestSessionSingleFlightAndRenewal(t *testing.T) {
	tr := &counting{}
	s := NewSession(keystoneCloud(t, "vtpmd-a"), &http.Client{Transport: tr})
	var wg sync.WaitGroup
	toks := make([]string, 16)
	for i := range toks {
		wg.Go(func() {
			tok, err := s.Token(context.Background())
			if err != nil {
				t.Error(err)
			}
			toks[i] = tok
		})
	}
	wg.Wait()
	if n := tr.posts.Load(); n != 1 {
		t.Errorf("16 concurrent callers made %d token requests", n)
	}
	for _, tok := range toks[1:] {
		if tok != toks[0] {
			t.Fatal("concurrent callers got different tokens")
		}
	}
	s.mu.Lock()
	due := renewAt(s.tok)
	s.mu.Unlock()
	s.SetClock(func() time.Time { return due.Add(-time.Second) })
	if mustToken(t, s) != toks[0] || tr.posts.Load() != 1 {
		t.Error("renewed before it was due")
	}
	s.SetClock(func() time.Time { return due })
	if mustToken(t, s) == toks[0] || tr.posts.Load() != 2 {
		t.Errorf("not renewed when due: %d requests", tr.posts.Load())
	}
}

// Concurrent validations of one token ask Keystone once; refusals are
// cached for NegativeTTL; the cache stays within MaxEntries.
func TestValidatorCache(t *testing.T) {
	ctx := context.Background()
	tr := &counting{}
	now := time.Now()
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	v := NewValidator(NewSession(keystoneCloud(t, "vtpmd"), &http.Client{Transport: tr}), ValidatorOptions{MaxEntries: 2, Now: clock})
	tok := mustToken(t, NewSession(keystoneCloud(t, "vtpmd-a"), nil))
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			if _, err := v.Validate(ctx, tok); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if n := tr.gets.Load(); n != 1 {
		t.Errorf("16 concurrent validations asked keystone %d times", n)
	}
	for range 2 {
		if _, err := v.Validate(ctx, "bogus"); !errors.Is(err, ErrInvalidToken) {
			t.Errorf("bogus token: %v", err)
		}
	}
	if n := tr.gets.Load(); n != 2 {
		t.Errorf("a refused token was asked about %d times, want once", n-1)
	}
	mu.Lock()
	now = now.Add(5 * time.Second)
	mu.Unlock()
	v.Validate(ctx, "bogus")
	if n := tr.gets.Load(); n != 3 {
		t.Errorf("a refusal was cached past NegativeTTL: %d requests", n)
	}
	for _, other := range []string{"x1", "x2", "x3"} {
		v.Validate(ctx, other)
	}
	v.mu.Lock()
	n := len(v.entries)
	v.mu.Unlock()
	if n > 2 {
		t.Errorf("the cache holds %d entries, more than MaxEntries 2", n)
	}
}

// A Keystone behind TLS with a private CA is reached when the credentials
// name the CA (clouds.yaml's cacert, OS_CACERT), and refused, saying why,
// when they do not.
func TestSessionPrivateCA(t *testing.T) {
	ctx := context.Background()
	a := keystoneCloud(t, "vtpmd-a")
	target, err := url.Parse(a.AuthURL)
	if err != nil {
		t.Fatal(err)
	}
	target.Path = ""
	tlsKeystone := httptest.NewTLSServer(httputil.NewSingleHostReverseProxy(target))
	t.Cleanup(tlsKeystone.Close)
	a.AuthURL = tlsKeystone.URL + "/v3"

	client, err := a.HTTPClient(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var unknown *tls.CertificateVerificationError
	if _, err := NewSession(a, client).Token(ctx); !errors.As(err, &unknown) {
		t.Fatalf("no CA named: %v, want a certificate verification error", err)
	}

	a.CACert = filepath.Join(t.TempDir(), "ca.pem")
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: tlsKeystone.Certificate().Raw})
	if err := os.WriteFile(a.CACert, ca, 0o644); err != nil {
		t.Fatal(err)
	}
	if client, err = a.HTTPClient(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if pid, err := NewSession(a, client).ProjectID(ctx); err != nil || pid == "" {
		t.Fatalf("with the CA: project %q, %v", pid, err)
	}
	// A token revoked through the same client (the console's sign-out):
	// Keystone no longer accepts it.
	tok, err := NewSession(a, client).Token(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := Revoke(ctx, &http.Client{Timeout: 10 * time.Second}, a.AuthURL, tok); !errors.As(err, &unknown) {
		t.Fatalf("revoking without the CA: %v, want a certificate verification error", err)
	}
	if err := Revoke(ctx, client, a.AuthURL, tok); err != nil {
		t.Fatalf("revoking with the CA: %v", err)
	}
	if _, err := NewSession(a, client).Validate(ctx, tok); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("the revoked token: %v, want ErrInvalidToken", err)
	}
	if err := Revoke(ctx, client, a.AuthURL, tok); err != nil {
		t.Fatalf("revoking a revoked token again: %v", err)
	}

	if err := os.WriteFile(a.CACert, []byte("not a certificate"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := a.HTTPClient(time.Second); err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Errorf("a CA file without certificates: %v", err)
	}
}
