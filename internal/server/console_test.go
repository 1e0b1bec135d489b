package server

import (
	"context"
	"io"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/store"
)

// The web console sees what the API lets its viewer see, by the same
// client certificates: a tenant its project's instances (another's
// instance page is not found, the fleet forbidden); a browser that proves
// nobody is sent to sign in. A sign-in link the operator makes on its
// socket gives a session cookie (HttpOnly, SameSite=Strict) scoped as the
// link says, through a form that a cross-site request cannot post; the
// link works once; the operator ends a project's sessions. Every
// page has a Content-Security-Policy without 'unsafe-inline', and a
// hostile event-log string is shown escaped.
func TestConsoleAccess(t *testing.T) {
	m := newMTLS(t)
	const other = "0b0b0b0b-0000-4000-8000-00000000c0de"
	for id, project := range map[string]string{inst: "p1", other: "p2"} {
		if code := m.call(t, "POST", "/v1/vtpms", "", createFor(id, project), nil); code != 202 {
			t.Fatalf("create %s: %d", id, code)
		}
	}
	// p1's instance booted a kernel command line the policy does not
	// know, which holds markup.
	ref, want := attesttest.EventLog([]attesttest.Measurement{{PCR: 8, Type: 0x0d, Data: []byte("kernel_cmdline: quiet")}})
	cur, got := attesttest.EventLog([]attesttest.Measurement{{PCR: 8, Type: 0x0d, Data: []byte("kernel_cmdline: <script>alert(1)</script>")}})
	now := time.Now().UTC()
	err := m.store.Update(context.Background(), func(tx *store.Tx) error {
		return tx.PutAttestation(&store.Attestation{InstanceID: inst, RegisteredAt: now, EvidenceAt: now, PCRs: got, EventLog: cur,
			PolicyPCRs: want, PolicyEventLog: ref, Verdict: store.VerdictUntrusted, Reasons: []string{"PCR 8 differs"}})
	})
	if err != nil {
		t.Fatal(err)
	}

	p1 := m.client(m.tenant.issue(t, "alice", "p1"))
	page := func(c *http.Client, path string, wantStatus int) string {
		t.Helper()
		resp, err := c.Get(m.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != wantStatus {
			t.Fatalf("GET %s: %d, want %d: %s", path, resp.StatusCode, wantStatus, body)
		}
		csp := resp.Header.Get("Content-Security-Policy")
		if !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe-inline") {
			t.Fatalf("GET %s: Content-Security-Policy %q", path, csp)
		}
		return string(body)
	}
	list := page(p1, "/ui/instances", 200)
	if !strings.Contains(list, inst) || strings.Contains(list, other) || !strings.Contains(list, "project p1 (alice)") {
		t.Fatalf("p1's instances page:\n%s", list)
	}
	page(p1, "/ui/instances/"+other, 404)
	page(p1, "/ui/fleet", 403)
	mine := page(p1, "/ui/instances/"+inst, 200)
	if !strings.Contains(mine, "kernel_cmdline: &lt;script&gt;alert(1)&lt;/script&gt;") || strings.Contains(mine, "<script>alert") ||
		!strings.Contains(mine, "kernel_cmdline: quiet") {
		t.Fatalf("the PCR view does not show both events escaped:\n%s", mine)
	}
	// No inline script, style or handler on any page.
	if inline := regexp.MustCompile(`<script>|<style|\sstyle=|\son[a-z]+=`); inline.MatchString(mine) || inline.MatchString(list) {
		t.Fatalf("inline script or style: %v", inline.FindAllString(mine+list, -1))
	}

	// Nobody: to the sign-in page. A tenant cannot make links.
	noCert := m.client(nil)
	noCert.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	resp, err := noCert.Get(m.srv.URL + "/ui/instances")
	if err != nil || resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/ui/login" {
		t.Fatalf("no certificate: %v %v", resp, err)
	}
	if code := m.do(t, p1, "POST", "/v1/console/links", nil, nil); code != 403 {
		t.Fatalf("a tenant making a sign-in link: %d", code)
	}

	// The operator's link for p2's view.
	var link api.ConsoleLink
	if code := m.call(t, "POST", "/v1/console/links?project=p2", "", nil, &link); code != 201 || link.Project != "p2" {
		t.Fatalf("a sign-in link: %d %+v", code, link)
	}
	u, _ := url.Parse(link.URL)
	code := u.Query().Get("code")
	if !strings.Contains(page(noCert, "/ui/login?code="+url.QueryEscape(code), 200), "project p2") {
		t.Fatal("the sign-in page does not say who the link signs in as")
	}
	signIn := func(code, site string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest("POST", m.srv.URL+"/ui/login", strings.NewReader(url.Values{"code": {code}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Sec-Fetch-Site", site)
		resp, err := noCert.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	if resp := signIn(code, "cross-site"); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("a cross-site sign-in: %d", resp.StatusCode)
	}
	if resp := signIn(code[:len(code)-2]+"AA", "same-origin"); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("a forged code: %d", resp.StatusCode)
	}
	resp = signIn(code, "same-origin")
	cookies := resp.Cookies()
	if resp.StatusCode != http.StatusSeeOther || len(cookies) != 1 || !cookies[0].HttpOnly || cookies[0].SameSite != http.SameSiteStrictMode {
		t.Fatalf("signing in: %d %+v", resp.StatusCode, cookies)
	}
	req, _ := http.NewRequest("GET", m.srv.URL+"/ui/instances", nil)
	req.AddCookie(cookies[0])
	resp, err = noCert.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), other) || strings.Contains(string(body), inst) {
		t.Fatalf("p2's session sees: %d\n%s", resp.StatusCode, body)
	}
	if resp := signIn(code, "same-origin"); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("a link used twice: %d", resp.StatusCode)
	}

	// The operator ends p2's sessions (a tenant cannot): the cookie is
	// refused from then on.
	if code := m.do(t, p1, "DELETE", "/v1/console/sessions", nil, nil); code != 403 {
		t.Fatalf("a tenant ending sessions: %d", code)
	}
	var ended api.ConsoleSessionsEnded
	if code := m.call(t, "DELETE", "/v1/console/sessions?project=p2", "", nil, &ended); code != 200 || ended.Ended != 1 || ended.Project != "p2" {
		t.Fatalf("ending p2's sessions: %d %+v", code, ended)
	}
	resp, err = noCert.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/ui/login" {
		t.Fatalf("p2's ended session: %d", resp.StatusCode)
	}

	// Assets: by content hash, kept for good.
	css := regexp.MustCompile(`/ui/assets/console\.[0-9a-f]{12}\.css`).FindString(list)
	resp, err = p1.Get(m.srv.URL + css)
	if err != nil || css == "" || resp.StatusCode != 200 || !strings.Contains(resp.Header.Get("Cache-Control"), "immutable") {
		t.Fatalf("the stylesheet %q: %v %v", css, resp, err)
	}
	resp.Body.Close()
}

// consolePage fetches the console's page at path as the operator (its
// socket), failing unless it answers 200.
func consolePage(t *testing.T, f *fixture, path string) string {
	t.Helper()
	resp, err := f.http.Get(f.url + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d\n%s", path, resp.StatusCode, body)
	}
	return string(body)
}

// An instance untrusted by its policy of allowed file digests on PCR 10
// (a real IMA log, quoted by its vTPM): the Instance page shows, beside
// PCR 10, the first IMA entry the policy does not allow (its index, its
// path, its digest, how many more) and what the policy allows instead;
// the path holds markup, shown as text.
func TestConsoleIMAEntry(t *testing.T) {
	f := newFixture(t)
	g := newGuest(t, f, []attesttest.Measurement{{PCR: 0, Type: 0x8, Data: []byte("firmware")}})
	files := []attesttest.IMAFile{{Path: "boot_aggregate", Content: []byte("agg")}, {Path: "/usr/sbin/sshd", Content: []byte("sshd")},
		{Path: "/tmp/<script>alert(1)</script>", Content: []byte("rootkit")}, {Path: "/usr/bin/nc", Content: []byte("nc")}}
	imaLog, extends := attesttest.IMALog(files)
	for _, e := range extends {
		g.measure(t, attest.IMAPCR, e)
	}
	if err := os.WriteFile(g.imaLog, imaLog, 0o600); err != nil {
		t.Fatal(err)
	}
	g.agent.IMALog = g.imaLog
	ctx := context.Background()
	if err := g.agent.Register(ctx); err != nil {
		t.Fatal(err)
	}
	applyPolicy(t, f, "files", map[int][]string{attest.IMAPCR: {digestHex("agg"), digestHex("sshd")}})
	if a, err := g.agent.Attest(ctx); err != nil || a.Verdict != "untrusted" {
		t.Fatalf("the agent's evidence: %+v %v", a, err)
	}
	page := consolePage(t, f, "/ui/instances/"+inst)
	row := regexp.MustCompile(`(?s)<tr class="diff ima" id="pcr-10-ima">.*?</tr>`).FindString(page)
	for _, want := range []string{
		"first IMA entry the policy does not allow (and 1 more)",
		"<strong>not in the policy</strong>", "it allows 2 file digests, not this one:",
		`<code class="digest">` + digestHex("agg") + "</code>", `<code class="digest">` + digestHex("sshd") + "</code>",
		"<strong>#2 ima-ng</strong>", `<span class="desc">/tmp/&lt;script&gt;alert(1)&lt;/script&gt;</span>`,
		`<code class="digest">sha256:` + digestHex("rootkit") + "</code>",
	} {
		if !strings.Contains(row, want) {
			t.Errorf("PCR 10's IMA entry lacks %q", want)
		}
	}
	if t.Failed() || strings.Contains(page, "<script>alert") || !strings.Contains(page, `<tr class="bad" id="pcr-10">`) {
		t.Fatalf("the PCR view of an IMA mismatch:\n%s", page)
	}
}
