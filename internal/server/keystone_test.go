package server

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keystone"
)

// ksFixture is the API with Keystone authentication against the real
// Keystone (ostest), its service user the "vtpmd" cloud.
type ksFixture struct {
	*fixture
	clock *ksClock
}

// ksClock is the Validator's clock, moved by the test.
type ksClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *ksClock) Now() time.Time  { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *ksClock) Set(t time.Time) { c.mu.Lock(); defer c.mu.Unlock(); c.now = t }

func newKeystoneFixture(t *testing.T, opts keystone.ValidatorOptions) *ksFixture {
	t.Helper()
	svc := keystoneCloud(t, "vtpmd")
	f := &ksFixture{fixture: newFixture(t), clock: &ksClock{now: time.Now()}}
	if opts.Now == nil {
		opts.Now = f.clock.Now
	}
	f.api.Identity = &Identity{Tokens: keystone.NewValidator(keystone.NewSession(svc, nil), opts), AdminProject: "admin"}
	return f
}

// as calls the network API with a Keystone token ("" for none) and, when
// project is set, X-Project-ID; it returns the status and decodes into out.
func (f *ksFixture) as(t *testing.T, token, method, path, project string, body, out any) int {
	t.Helper()
	code, _ := tokenCall(t, f.srv.URL, token, method, path, project, body, out)
	return code
}

// tokenCall is one request to the API at base with a Keystone token.
func tokenCall(t *testing.T, base, token, method, path, project string, body, out any) (int, http.Header) {
	t.Helper()
	var r io.Reader
	if body != nil {
		data, _ := json.Marshal(body)
		r = bytes.NewReader(data)
	}
	req, _ := http.NewRequest(method, base+path, r)
	if token != "" {
		req.Header.Set(api.TokenHeader, token)
	}
	if project != "" {
		req.Header.Set(api.ProjectHeader, project)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s: %d %s: %v", method, path, resp.StatusCode, data, err)
		}
	}
	return resp.StatusCode, resp.Header
}

// createIn asks for a TPM 2.0 for id in the caller's own project.
func createIn(id string) api.CreateVTPMRequest {
	r := create(id, map[string]string{"hw:tpm_version": "2.0"})
	r.Project = ""
	return r
}

// Two projects' members create and see only their own vTPMs, another
// project's reads as absent, a reader reads but changes nothing, the admin
// (system scope or the admin project) sees all, and the event log names
// the Keystone user.
func TestKeystoneRoles(t *testing.T) {
	f := newKeystoneFixture(t, keystone.ValidatorOptions{})
	a, b := keystoneToken(t, "vtpmd-a"), keystoneToken(t, "vtpmd-b")
	reader := keystoneToken(t, "vtpmd-a-reader")
	admin, system := keystoneToken(t, "admin"), keystoneToken(t, "admin-system")
	const instA, instB = "a0a0a0a0-0000-4000-8000-00000000000a", "b0b0b0b0-0000-4000-8000-00000000000b"

	var va, vb api.VTPM
	if code := f.as(t, a, "POST", "/v1/vtpms", "", createIn(instA), &va); code != 202 || va.Project == "" {
		t.Fatalf("member a creates: %d %+v", code, va)
	}
	if code := f.as(t, b, "POST", "/v1/vtpms", "", createIn(instB), &vb); code != 202 || vb.Project == "" || vb.Project == va.Project {
		t.Fatalf("member b creates: %d %+v (a's project %s)", code, vb, va.Project)
	}
	var e api.ErrorBody
	if code := f.as(t, a, "POST", "/v1/vtpms", "", func() api.CreateVTPMRequest {
		r := createIn("c0c0c0c0-0000-4000-8000-00000000000c")
		r.Project = vb.Project
		return r
	}(), &e); code != 403 || e.Error.Code != api.CodeInvalidProject {
		t.Errorf("member a creates in b's project: %d %+v", code, e)
	}

	sees := func(who, token string, want ...string) {
		t.Helper()
		var l api.VTPMList
		if code := f.as(t, token, "GET", "/v1/vtpms", "", nil, &l); code != 200 {
			t.Fatalf("%s lists: %d", who, code)
		}
		var got []string
		for _, v := range l.Items {
			got = append(got, v.InstanceID)
		}
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Errorf("%s sees %v, want %v", who, got, want)
		}
	}
	sees("member a", a, instA)
	sees("member b", b, instB)
	sees("reader of a", reader, instA)
	sees("admin of the admin project", admin, instA, instB)
	sees("system admin", system, instA, instB)

	// Another project's vTPM reads as an absent one, for every verb.
	var absent, other api.ErrorBody
	f.as(t, a, "GET", "/v1/vtpms/11111111-2222-4333-8444-555555555555", "", nil, &absent)
	for _, r := range []struct{ method, path string }{
		{"GET", "/v1/vtpms/" + instB}, {"DELETE", "/v1/vtpms/" + instB}, {"POST", "/v1/vtpms/" + instB + "/stop"}, {"GET", "/v1/vtpms/" + instB + "/events"},
	} {
		if code := f.as(t, a, r.method, r.path, "", nil, &other); code != 404 || other != absent {
			t.Errorf("member a: %s %s: %d %+v, want 404 %+v", r.method, r.path, code, other, absent)
		}
	}
	// X-Project-ID may only repeat the token's project.
	if code := f.as(t, a, "GET", "/v1/vtpms", vb.Project, nil, &e); code != 403 || e.Error.Code != api.CodeInvalidProject {
		t.Errorf("member a scoped to b: %d %+v", code, e)
	}
	if code := f.as(t, a, "GET", "/v1/vtpms/"+instA, va.Project, nil, nil); code != 200 {
		t.Errorf("member a repeating its project: %d", code)
	}

	// The reader reads, and changes nothing.
	if code := f.as(t, reader, "GET", "/v1/vtpms/"+instA, "", nil, nil); code != 200 {
		t.Errorf("reader gets: %d", code)
	}
	for _, r := range []struct {
		method, path string
		body         any
	}{
		{"POST", "/v1/vtpms", createIn("d0d0d0d0-0000-4000-8000-00000000000d")},
		{"DELETE", "/v1/vtpms/" + instA, nil}, {"POST", "/v1/vtpms/" + instA + "/stop", nil},
		{"POST", "/v1/secrets", map[string]string{"payload": "c2VjcmV0"}},
	} {
		if code := f.as(t, reader, r.method, r.path, "", r.body, &e); code != 403 || e.Error.Code != api.CodeForbidden {
			t.Errorf("reader: %s %s: %d %+v, want 403 forbidden", r.method, r.path, code, e)
		}
	}

	// The operator's routes: the admins' only.
	for who, token := range map[string]string{"member a": a, "reader": reader} {
		if code := f.as(t, token, "GET", "/v1/hosts", "", nil, &e); code != 403 || e.Error.Code != api.CodeForbidden {
			t.Errorf("%s lists hosts: %d %+v", who, code, e)
		}
	}
	for who, token := range map[string]string{"admin": admin, "system admin": system} {
		if code := f.as(t, token, "GET", "/v1/hosts", "", nil, nil); code != 200 {
			t.Errorf("%s lists hosts: %d", who, code)
		}
	}
	// The admin acts for project a, as the operator may.
	if code := f.as(t, system, "POST", "/v1/vtpms/"+instA+"/stop", "", nil, nil); code != 202 {
		t.Errorf("system admin stops a's vTPM: %d", code)
	}

	// The caller's token goes on with the request, for a key manager that
	// acts as the caller.
	req, _ := http.NewRequest("GET", "/v1/vtpms", nil)
	req.Header.Set(api.TokenHeader, a)
	if req, err := f.api.authenticate(req); err != nil {
		t.Fatal(err)
	} else if got, ok := keyring.Token(req.Context()); !ok || got != a {
		t.Error("the authenticated request does not carry the caller's token for the keyring")
	}

	var evs api.EventList
	if code := f.as(t, a, "GET", "/v1/vtpms/"+instA+"/events", "", nil, &evs); code != 200 || len(evs.Items) == 0 {
		t.Fatalf("events: %d %+v", code, evs)
	}
	if want := "api:project:" + va.Project + ` (user "vtpmd-a")`; evs.Items[0].Actor != want {
		t.Errorf("the create's actor is %q, want %q", evs.Items[0].Actor, want)
	}
	if last := evs.Items[len(evs.Items)-1].Actor; last != `api:operator (user "admin")` {
		t.Errorf("the system admin's stop's actor is %q", last)
	}
}

// A missing, malformed or unknown token is 401; a revoked one is refused
// once the cache bound has passed (the Validator's clock moved past it,
// Keystone's answer real), never before it expired in the cache; and the
// cache never outlives the token's own expiry, whatever the bound.
func TestKeystoneRevokedAndExpired(t *testing.T) {
	f := newKeystoneFixture(t, keystone.ValidatorOptions{TTL: 30 * time.Second})
	var e api.ErrorBody
	for _, token := range []string{"", "not-a-token", "gAAAAABpZ2FyYmFnZQ"} {
		if code := f.as(t, token, "GET", "/v1/vtpms", "", nil, &e); code != 401 || e.Error.Code != api.CodeUnauthenticated {
			t.Errorf("token %q: %d %+v", token, code, e)
		}
	}

	tok := freshToken(t, "vtpmd-a")
	if code := f.as(t, tok, "GET", "/v1/vtpms", "", nil, nil); code != 200 {
		t.Fatalf("a fresh token: %d", code)
	}
	revoke(t, tok)
	if code := f.as(t, tok, "GET", "/v1/vtpms", "", nil, nil); code != 200 {
		t.Errorf("a revoked token within the cache bound: %d (the bound is what the cache promises, not earlier)", code)
	}
	f.clock.Set(time.Now().Add(31 * time.Second))
	if code := f.as(t, tok, "GET", "/v1/vtpms", "", nil, &e); code != 401 || e.Error.Code != api.CodeUnauthenticated {
		t.Errorf("a revoked token past the cache bound: %d %+v", code, e)
	}

	// A bound far longer than the token lives: the cache ends at its
	// expiry, and Keystone then refuses it (revoked here, as an expired
	// one would be: Keystone answers both 404).
	long := newKeystoneFixture(t, keystone.ValidatorOptions{TTL: 100 * time.Hour})
	tok = freshToken(t, "vtpmd-a")
	info := validate(t, tok)
	if code := long.as(t, tok, "GET", "/v1/vtpms", "", nil, nil); code != 200 {
		t.Fatalf("a fresh token: %d", code)
	}
	revoke(t, tok)
	long.clock.Set(info.ExpiresAt.Add(-time.Second))
	if code := long.as(t, tok, "GET", "/v1/vtpms", "", nil, nil); code != 200 {
		t.Errorf("cached until its expiry: %d", code)
	}
	long.clock.Set(info.ExpiresAt)
	if code := long.as(t, tok, "GET", "/v1/vtpms", "", nil, &e); code != 401 || e.Error.Code != api.CodeUnauthenticated {
		t.Errorf("at its expiry: %d %+v", code, e)
	}
}

// Keystone unreachable: a token caller gets 503 identity_unavailable with
// Retry-After, never 401 and never in; the operator's socket still works.
func TestKeystoneDown(t *testing.T) {
	f := newFixture(t)
	svc := keystoneCloud(t, "vtpmd")
	svc.AuthURL = "http://127.0.0.1:1/v3" // nothing listens there
	f.api.Identity = &Identity{Tokens: keystone.NewValidator(keystone.NewSession(svc, nil), keystone.ValidatorOptions{}), AdminProject: "admin"}
	var e api.ErrorBody
	code, hdr := tokenCall(t, f.srv.URL, keystoneToken(t, "vtpmd-a"), "GET", "/v1/vtpms", "", nil, &e)
	if code != 503 || e.Error.Code != api.CodeIdentityUnavailable || hdr.Get("Retry-After") == "" {
		t.Errorf("keystone down: %d %+v, Retry-After %q", code, e, hdr.Get("Retry-After"))
	}
	if code := f.call(t, "GET", "/v1/vtpms", "", nil, nil); code != 200 {
		t.Errorf("the operator's socket with keystone down: %d", code)
	}
}

// validate is Keystone's own answer about token, through the service user.
func validate(t *testing.T, token string) *keystone.Token {
	t.Helper()
	info, err := keystone.NewSession(keystoneCloud(t, "vtpmd"), nil).Validate(context.Background(), token)
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// revoke revokes token in Keystone (DELETE /v3/auth/tokens, the token
// revoking itself), and checks that Keystone then refuses it.
func revoke(t *testing.T, token string) {
	t.Helper()
	req, _ := http.NewRequest("DELETE", keystoneCloud(t, "vtpmd").AuthURL+"/auth/tokens", nil)
	req.Header.Set("X-Auth-Token", token)
	req.Header.Set("X-Subject-Token", token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 204 {
		t.Fatalf("revoking: %s", resp.Status)
	}
	if _, err := keystone.NewSession(keystoneCloud(t, "vtpmd"), nil).Validate(context.Background(), token); err != keystone.ErrInvalidToken {
		t.Fatalf("keystone after revoking: %v, want ErrInvalidToken", err)
	}
}
