package server

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/console"
	"github.com/vtpmd/vtpmd/internal/keystone"
)

// The web console's Keystone sign-in, against the real Keystone: a
// project member's password gets a token kept in an HttpOnly,
// SameSite=Strict cookie (never the password), and the pages then show
// that project's instances alone; a wrong password is refused with
// Keystone's answer in words; signing out ends the session: the cookie,
// sent again, is refused, and Keystone no longer honours its token.
func TestConsoleKeystoneSignIn(t *testing.T) {
	f := newKeystoneFixture(t, keystone.ValidatorOptions{})
	a := keystoneCloud(t, "vtpmd-a")
	f.api.Identity.URL = a.AuthURL
	f.api.Console = console.New(console.Config{Store: f.store, VTPMs: f.api.VTPMs, Verifier: f.api.Verifier,
		Authenticate: f.api.BrowserViewer, SignIn: f.api.KeystoneSignIn, SignOut: f.api.KeystoneSignOut})
	srv := httptest.NewServer(f.api.Console.Handler())
	t.Cleanup(srv.Close)
	const instA, instB = "a0a0a0a0-0000-4000-8000-0000000000c1", "b0b0b0b0-0000-4000-8000-0000000000c2"
	if code := f.as(t, keystoneToken(t, "vtpmd-a"), "POST", "/v1/vtpms", "", createIn(instA), nil); code != 202 {
		t.Fatalf("a's create: %d", code)
	}
	if code := f.as(t, keystoneToken(t, "vtpmd-b"), "POST", "/v1/vtpms", "", createIn(instB), nil); code != 202 {
		t.Fatalf("b's create: %d", code)
	}

	browser := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	post := func(path string, form url.Values, cookies ...*http.Cookie) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest("POST", srv.URL+path, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Sec-Fetch-Site", "same-origin")
		for _, c := range cookies {
			req.AddCookie(c)
		}
		resp, err := browser.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp, string(body)
	}
	form := url.Values{"user": {a.Username}, "password": {"not the password"}, "project": {a.ProjectName}, "domain": {a.UserDomainName}}
	if resp, body := post("/ui/login", form); resp.StatusCode != http.StatusUnauthorized || !strings.Contains(body, "Keystone did not accept") ||
		len(resp.Cookies()) != 0 {
		t.Fatalf("a wrong password: %d %v\n%s", resp.StatusCode, resp.Cookies(), body)
	}
	form.Set("password", a.Password)
	resp, _ := post("/ui/login", form)
	cookies := resp.Cookies()
	if resp.StatusCode != http.StatusSeeOther || len(cookies) != 1 || !cookies[0].HttpOnly || cookies[0].SameSite != http.SameSiteStrictMode ||
		cookies[0].MaxAge <= 0 || strings.Contains(cookies[0].Value, a.Password) {
		t.Fatalf("signing in: %d %+v", resp.StatusCode, cookies)
	}
	instances := func() (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", srv.URL+"/ui/instances", nil)
		req.AddCookie(cookies[0])
		got, err := browser.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(got.Body)
		got.Body.Close()
		return got, string(body)
	}
	if got, body := instances(); got.StatusCode != 200 || !strings.Contains(body, instA) || strings.Contains(body, instB) || !strings.Contains(body, a.Username) {
		t.Fatalf("a's instances: %d\n%s", got.StatusCode, body)
	}
	// Keystone's answer about the token, asked with the token itself.
	keystoneKnows := func() int {
		t.Helper()
		req, _ := http.NewRequest("GET", strings.TrimSuffix(strings.TrimRight(a.AuthURL, "/"), "/v3")+"/v3/auth/tokens?nocatalog", nil)
		req.Header.Set("X-Auth-Token", cookies[0].Value)
		req.Header.Set("X-Subject-Token", cookies[0].Value)
		got, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		got.Body.Close()
		return got.StatusCode
	}
	if code := keystoneKnows(); code != http.StatusOK {
		t.Fatalf("Keystone on the signed-in token: %d", code)
	}
	resp, _ = post("/ui/logout", nil, cookies[0])
	if out := resp.Cookies(); resp.StatusCode != http.StatusSeeOther || len(out) != 1 || out[0].MaxAge >= 0 {
		t.Fatalf("signing out: %d %+v", resp.StatusCode, out)
	}
	if got, _ := instances(); got.StatusCode != http.StatusSeeOther || got.Header.Get("Location") != "/ui/login" {
		t.Fatalf("the signed-out cookie: %d", got.StatusCode)
	}
	if code := keystoneKnows(); code != http.StatusNotFound && code != http.StatusUnauthorized {
		t.Fatalf("Keystone on the signed-out token: %d, want it revoked", code)
	}
}
