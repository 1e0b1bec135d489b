package server

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"html"
	"io"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/spec"
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

	// A policy that learned PCR 10's value, and a file measured since:
	// the value differs, and the page says that no file can be named.
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/attestation/policy", "", api.PolicyRequest{Learn: true, PCRs: []int{attest.IMAPCR}}, nil); code != 200 {
		t.Fatalf("learning PCR 10's value: %d", code)
	}
	files = append(files, attesttest.IMAFile{Path: "/usr/bin/curl", Content: []byte("curl")})
	imaLog, extends = attesttest.IMALog(files)
	g.measure(t, attest.IMAPCR, extends[len(extends)-1])
	if err := os.WriteFile(g.imaLog, imaLog, 0o600); err != nil {
		t.Fatal(err)
	}
	if a, err := g.agent.Attest(ctx); err != nil || a.Verdict != "untrusted" || !strings.HasPrefix(a.Reasons[0], "PCR 10 is ") {
		t.Fatalf("the evidence after another file: %+v %v", a, err)
	}
	page = consolePage(t, f, "/ui/instances/"+inst)
	if !strings.Contains(page, "The policy holds PCR 10's value, not the files IMA measured, so the file that changed cannot be named") ||
		strings.Contains(page, "pcr-10-ima") {
		t.Fatalf("the PCR view of PCR 10's value:\n%s", page)
	}
}

var (
	href      = regexp.MustCompile(`href="(/ui/[^"]*)"`)
	tag       = regexp.MustCompile(`<[^>]*>`)
	cell      = regexp.MustCompile(`(?s)<td>(.*?)</td>`)
	chartRow  = regexp.MustCompile(`<tr><td>([^<]*)</td><td>([^<]*)</td></tr>`)
	chartPart = regexp.MustCompile(`(\d+) (trusted|untrusted|stale|pending)`)
)

// text is an HTML fragment's text: its tags dropped, entities read, and
// spaces collapsed.
func text(s string) string {
	return strings.Join(strings.Fields(html.UnescapeString(tag.ReplaceAllString(s, " "))), " ")
}

// hostCells are the cells of host's row of the Fleet page, as text.
func hostCells(t *testing.T, page, host string) []string {
	t.Helper()
	row := regexp.MustCompile(`(?s)<th scope="row"><a href="/ui/instances\?host=` + regexp.QuoteMeta(host) + `">` + regexp.QuoteMeta(host) + `</a></th>(.*?)</tr>`).FindStringSubmatch(page)
	if row == nil {
		t.Fatalf("the Fleet page has no row for host %s:\n%s", host, page)
	}
	var out []string
	for _, m := range cell.FindAllStringSubmatch(row[1], -1) {
		out = append(out, text(m[1]))
	}
	return out
}

// crawl reads every console page reachable from start by the pages'
// links, through get; each must answer 200, and there may be no more
// than limit.
func crawl(t *testing.T, get func(path string) (int, string), limit int, start ...string) map[string]string {
	t.Helper()
	pages := map[string]string{}
	queue := slices.Clone(start)
	for len(queue) > 0 {
		path := queue[0]
		queue = queue[1:]
		if _, seen := pages[path]; seen || strings.HasPrefix(path, "/ui/assets/") || path == "/ui/live" {
			continue
		}
		if len(pages) == limit {
			t.Fatalf("more than %d pages from %v", limit, start)
		}
		code, body := get(path)
		if code != 200 {
			t.Fatalf("GET %s: %d\n%s", path, code, body)
		}
		pages[path] = body
		for _, m := range href.FindAllStringSubmatch(body, -1) {
			queue = append(queue, html.UnescapeString(m[1]))
		}
	}
	return pages
}

// The Fleet page shows each host's state (a host whose agent went quiet
// is down, a drained one draining), capacity used, backend, traits, its
// own attestation verdict and first reason (escaped), agent version and
// last heartbeat; the chart's table has the hours' verdict changes, the
// same numbers as the chart. No page, the operator's or a tenant's,
// shows a secret: a vTPM's key-manager secret id, a broker secret's key
// id or payload, an agent's token or its hash, a join token, a sign-in
// link's code or a session's cookie.
func TestConsoleFleetAndNoSecrets(t *testing.T) {
	c := &clock{now: time.Now().UTC().Add(-3 * time.Hour)}
	f := newFixtureWith(t, setup{now: c.Now})
	ctx := context.Background()
	caps := spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V20}, Models: []spec.Model{spec.TIS, spec.CRB}}
	put := func(fn func(tx *store.Tx) error) {
		t.Helper()
		if err := f.store.Update(ctx, fn); err != nil {
			t.Fatal(err)
		}
	}
	// Three hours ago: host gone's agent was last heard from, and two
	// verdicts changed to untrusted.
	then := c.Now()
	put(func(tx *store.Tx) error {
		if err := tx.PutHost(&store.Host{Name: "gone", Traits: []string{"tpm-2.0"}, Capacity: 4, Backend: "libvirt", Version: "1.3.0"}); err != nil {
			return err
		}
		for range 2 {
			if err := tx.AppendEvent(store.Event{Actor: "verifier", InstanceID: store.HostKey("gone"), Action: "attestation untrusted"}); err != nil {
				return err
			}
		}
		return nil
	})
	c.advance(3 * time.Hour)
	put(func(tx *store.Tx) error {
		return tx.PutHost(&store.Host{Name: "h1", Traits: spec.HostTraits(caps).List(), Capacity: 2, Backend: "swtpm", Version: "1.5.0"})
	})
	if code := f.call(t, "POST", "/v1/vtpms", "", createFor(inst, "p1"), nil); code != 202 {
		t.Fatalf("create %s: %d", inst, code)
	}
	hostVerdict(t, f, store.VerdictTrusted, time.Now())
	g := trustedGuest(t, f, instB, "p1")
	put(func(tx *store.Tx) error {
		for _, h := range []*store.Host{{Name: "drain", Traits: []string{"gpu", "tpm-2.0"}, Capacity: 3, Backend: "swtpm", Version: "1.5.0"},
			{Name: "sick", Traits: []string{"tpm-2.0"}, Capacity: 4, Backend: "xen", Version: "1.4.9"}} {
			if err := tx.PutHost(h); err != nil {
				return err
			}
		}
		if _, err := tx.SetDraining("drain", true); err != nil {
			return err
		}
		now := time.Now().UTC()
		return tx.PutAttestation(&store.Attestation{InstanceID: store.HostKey("sick"), RegisteredAt: now, EvidenceAt: now, Verdict: store.VerdictUntrusted,
			Reasons: []string{"PCR 0 is 0000…, the policy wants <img src=x onerror=alert(1)>"}})
	})

	fleet := consolePage(t, f, "/ui/fleet")
	for host, want := range map[string][]string{
		"gone":  {"down", "0 / 4", "libvirt", "tpm-2.0", "unattested", "1.3.0", "3 h ago"},
		"h1":    {"up", "2 / 2", "swtpm", strings.Join(spec.HostTraits(caps).List(), ", "), "trusted", "1.5.0", "0 s ago"},
		"drain": {"draining", "0 / 3", "swtpm", "gpu, tpm-2.0", "unattested", "1.5.0", "0 s ago"},
		"sick":  {"up", "0 / 4", "xen", "tpm-2.0", "untrusted PCR 0 is 0000…, the policy wants <img src=x onerror=alert(1)>", "1.4.9", "0 s ago"},
	} {
		if got := hostCells(t, fleet, host); !slices.Equal(got, want) {
			t.Errorf("host %s's cells: %q, want %q", host, got, want)
		}
	}
	if !strings.Contains(fleet, `<meter min="0" max="2" value="2" aria-label="2 of 2">`) || !strings.Contains(fleet, `<span class="badge h-draining">draining</span>`) ||
		!strings.Contains(fleet, "the policy wants &lt;img src=x onerror=alert(1)&gt;") || strings.Contains(fleet, "<img") {
		t.Errorf("the Fleet page's capacity, state badge or escaped reason:\n%s", fleet)
	}
	// The chart's table: three hours ago the two changes, and the hours'
	// numbers add up to the chart's count, a bar's part for each.
	var rows [][]string
	total, parts := 0, 0
	for _, m := range chartRow.FindAllStringSubmatch(fleet, -1) {
		rows = append(rows, m[1:])
		for _, p := range chartPart.FindAllStringSubmatch(m[2], -1) {
			n, _ := strconv.Atoi(p[1])
			total, parts = total+n, parts+1
		}
	}
	hour := then.Truncate(time.Hour).Format("2006-01-02 15:04:05Z")
	if len(rows) == 0 || rows[0][0] != hour || strings.TrimSpace(rows[0][1]) != "2 untrusted" {
		t.Errorf("the chart's table: %q, want the hour %s first with 2 untrusted", rows, hour)
	}
	if !strings.Contains(fleet, fmt.Sprintf(`Verdict changes, last 24 hours <span class="count">%d</span>`, total)) ||
		!strings.Contains(fleet, fmt.Sprintf("over the last 24 hours: %d in all", total)) || strings.Count(fleet, "<rect ") != parts {
		t.Errorf("the chart's count or bars are not its table's %d changes in %d parts:\n%s", total, parts, fleet)
	}
	if t.Failed() {
		t.FailNow()
	}

	// The secrets of this fixture.
	var secretID, keyID string
	payload := "luks key 0123456789"
	if code := f.call(t, "POST", "/v1/broker/secrets", "p1", api.CreateBrokerSecretRequest{Name: "disk", Payload: []byte(payload), ReleaseTo: []string{instB}}, nil); code != 201 {
		t.Fatalf("creating a broker secret: %d", code)
	}
	put(func(tx *store.Tx) error {
		v, err := tx.GetVTPM(inst)
		if err != nil {
			return err
		}
		s, err := tx.GetBrokerSecret("p1", "disk")
		if err != nil {
			return err
		}
		secretID, keyID = v.SecretID, s.KeyID
		return nil
	})
	var join api.JoinToken
	if code := f.call(t, "POST", "/v1/hosts/sick/join-tokens", "", nil, &join); code != 201 {
		t.Fatalf("a join token: %d", code)
	}
	var link api.ConsoleLink
	if code := f.call(t, "POST", "/v1/console/links?project=p1", "", nil, &link); code != 201 {
		t.Fatalf("a sign-in link: %d", code)
	}
	u, _ := url.Parse(link.URL)
	code := u.Query().Get("code")
	req, _ := http.NewRequest("POST", f.srv.URL+"/ui/login", strings.NewReader(url.Values{"code": {code}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Sec-Fetch-Site", "same-origin")
	resp, err := (&http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if len(resp.Cookies()) != 1 {
		t.Fatalf("signing in as p1: %d %v", resp.StatusCode, resp.Cookies())
	}
	cookie := resp.Cookies()[0]
	tokenHash := sha256.Sum256([]byte(g.agent.Token()))
	secrets := map[string]string{
		"the vTPM's key-manager secret id": secretID, "the broker secret's key id": keyID, "the broker secret's payload": payload,
		"the payload in base64": base64.StdEncoding.EncodeToString([]byte(payload)), "the agent's token": g.agent.Token(),
		"the agent token's hash": hex.EncodeToString(tokenHash[:]), "a join token": join.Token, "a sign-in link's code": code,
		"a session's cookie": cookie.Value,
	}
	for what, s := range secrets {
		if len(s) < 8 || s == inst || s == instB {
			t.Fatalf("%s is %q: not a secret to look for", what, s)
		}
	}

	operator := crawl(t, func(path string) (int, string) {
		resp, err := f.http.Get(f.url + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}, 400, "/ui/fleet", "/ui/login", "/ui/instances/"+inst, "/ui/instances/"+instB)
	tenant := crawl(t, func(path string) (int, string) {
		req, _ := http.NewRequest("GET", f.srv.URL+path, nil)
		req.AddCookie(cookie)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}, 400, "/ui/instances")
	for _, want := range []string{"/ui/fleet", "/ui/instances", "/ui/policies", "/ui/instances/" + inst, "/ui/instances/" + instB} {
		if _, ok := operator[want]; !ok {
			t.Errorf("the operator's crawl did not reach %s", want)
		}
	}
	if _, ok := tenant["/ui/instances/"+instB]; !ok || len(tenant) < 5 {
		t.Errorf("p1's crawl: %d pages, not its instance's", len(tenant))
	}
	for who, pages := range map[string]map[string]string{"the operator's": operator, "p1's": tenant} {
		for path, body := range pages {
			for what, s := range secrets {
				if strings.Contains(body, s) {
					t.Errorf("%s page %s shows %s", who, path, what)
				}
			}
			if strings.Contains(body, "PRIVATE KEY") {
				t.Errorf("%s page %s shows a private key", who, path)
			}
		}
	}
	if !t.Failed() {
		t.Logf("%d of the operator's pages and %d of p1's, none with a secret", len(operator), len(tenant))
	}
}
