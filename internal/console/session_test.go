package console

import (
	"bufio"
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
)

// testConsole is a console on a fresh store, both on the clock the test
// moves.
func testConsole(t *testing.T) (*Console, *store.Store, func(time.Duration)) {
	t.Helper()
	var mu sync.Mutex
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	st := storetest.Opener(t, t.TempDir(), store.Options{Now: clock})()
	return New(Config{Store: st, Now: clock}), st, func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
}

// post posts form to the console's path as a same-origin page would (or
// from another site), with cookie if any.
func post(c *Console, path string, form url.Values, site string, cookie *http.Cookie) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	r := httptest.NewRequest("POST", path, strings.NewReader(form.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	r.Header.Set("Sec-Fetch-Site", site)
	if cookie != nil {
		r.AddCookie(cookie)
	}
	c.Handler().ServeHTTP(w, r)
	return w
}

// get fetches path with cookie; a page for nobody redirects to sign in.
func get(c *Console, path string, cookie *http.Cookie) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	r := httptest.NewRequest("GET", path, nil)
	if cookie != nil {
		r.AddCookie(cookie)
	}
	c.Handler().ServeHTTP(w, r)
	return w
}

// signIn makes a link for v and signs in with it: the session's cookie.
func signIn(t testing.TB, c *Console, v Viewer) *http.Cookie {
	t.Helper()
	link, _, err := c.Link(context.Background(), v)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(link)
	w := post(c, "/ui/login", url.Values{"code": {u.Query().Get("code")}}, "same-origin", nil)
	cookies := w.Result().Cookies()
	if w.Code != http.StatusSeeOther || len(cookies) != 1 || cookies[0].MaxAge <= 0 || !cookies[0].HttpOnly || cookies[0].SameSite != http.SameSiteStrictMode {
		t.Fatalf("signing in: %d %v", w.Code, cookies)
	}
	return cookies[0]
}

func signedOut(w *httptest.ResponseRecorder) bool {
	return w.Code == http.StatusSeeOther && w.Header().Get("Location") == "/ui/login"
}

// Sign-in links: a link signs in once posted, as whom it says, until it
// expires; posted again, or after its time, it is refused; a session
// lasts its time, then is nobody.
func TestSessions(t *testing.T) {
	c, _, advance := testConsole(t)
	link, exp, err := c.Link(context.Background(), Viewer{Name: "ops", Project: "p1"})
	if err != nil || !exp.Equal(time.Date(2026, 12, 3, 12, 15, 0, 0, time.UTC)) {
		t.Fatalf("expires %v %v", exp, err)
	}
	u, _ := url.Parse(link)
	code := u.Query().Get("code")
	if w := get(c, "/ui/login?code="+url.QueryEscape(code), nil); w.Code != 200 || !strings.Contains(w.Body.String(), "project p1 (ops)") {
		t.Fatalf("the sign-in page: %d\n%s", w.Code, w.Body)
	}
	w := post(c, "/ui/login", url.Values{"code": {code}}, "same-origin", nil)
	cookies := w.Result().Cookies()
	if w.Code != http.StatusSeeOther || len(cookies) != 1 {
		t.Fatalf("signing in: %d %v", w.Code, cookies)
	}
	session := cookies[0]
	if w := get(c, "/ui/instances", session); w.Code != 200 || !strings.Contains(w.Body.String(), "project p1 (ops)") {
		t.Fatalf("the session's page: %d", w.Code)
	}
	// The link is used up, and a cookie is no link.
	if w := post(c, "/ui/login", url.Values{"code": {code}}, "same-origin", nil); w.Code != http.StatusUnauthorized {
		t.Fatalf("a link used twice: %d", w.Code)
	}
	if w := post(c, "/ui/login", url.Values{"code": {session.Value}}, "same-origin", nil); w.Code != http.StatusUnauthorized {
		t.Fatalf("a session's cookie as a link: %d", w.Code)
	}
	link, _, _ = c.Link(context.Background(), Viewer{Name: "ops"})
	u, _ = url.Parse(link)
	if w := get(c, "/ui/instances", &http.Cookie{Name: cookieName, Value: u.Query().Get("code")}); !signedOut(w) {
		t.Fatalf("a link's code as a cookie: %d", w.Code)
	}
	advance(LinkTTL)
	if w := post(c, "/ui/login", url.Values{"code": {u.Query().Get("code")}}, "same-origin", nil); w.Code != http.StatusUnauthorized {
		t.Fatalf("an expired link: %d", w.Code)
	}
	if w := get(c, "/ui/instances", session); w.Code != 200 {
		t.Fatalf("the session ended with the link's time: %d", w.Code)
	}
	advance(12 * time.Hour)
	if w := get(c, "/ui/instances", session); !signedOut(w) {
		t.Fatalf("a page with an expired session: %d %s", w.Code, w.Header().Get("Location"))
	}
}

// Signing out ends the session for good, server-side: the same cookie
// sent again is nobody's, on every console that shares the store; and the
// sign-out form cannot be posted from another site. The operator ends
// every session (or a project's) at once, links not yet used included.
func TestSignOut(t *testing.T) {
	c, st, _ := testConsole(t)
	other := New(Config{Store: st}) // another replica
	session := signIn(t, c, Viewer{Name: "ops"})
	if w := get(other, "/ui/instances", session); w.Code != 200 {
		t.Fatalf("the session on another replica: %d", w.Code)
	}
	if w := post(c, "/ui/logout", nil, "cross-site", session); w.Code != http.StatusForbidden {
		t.Fatalf("a cross-site sign-out: %d", w.Code)
	}
	if w := get(c, "/ui/instances", session); w.Code != 200 {
		t.Fatalf("after a refused sign-out: %d", w.Code)
	}
	w := post(c, "/ui/logout", nil, "same-origin", session)
	if out := w.Result().Cookies(); !signedOut(w) || len(out) != 1 || out[0].Name != cookieName || out[0].MaxAge >= 0 {
		t.Fatalf("signing out: %d %v", w.Code, out)
	}
	for _, replica := range []*Console{c, other} {
		if w := get(replica, "/ui/instances", session); !signedOut(w) {
			t.Fatalf("the signed-out cookie: %d", w.Code)
		}
	}

	// Ending p1's sessions, then all.
	ops, p1, p2 := signIn(t, c, Viewer{Name: "ops"}), signIn(t, c, Viewer{Name: "a", Project: "p1"}), signIn(t, c, Viewer{Name: "b", Project: "p2"})
	link, _, _ := c.Link(context.Background(), Viewer{Name: "c", Project: "p2"})
	if n, err := other.EndSessions(context.Background(), "p1"); err != nil || n != 1 {
		t.Fatalf("ending p1's: %d %v", n, err)
	}
	for cookie, want := range map[*http.Cookie]bool{ops: true, p1: false, p2: true} {
		if w := get(c, "/ui/instances", cookie); signedOut(w) == want {
			t.Fatalf("%s's session after p1's ended: %d", cookie.Value, w.Code)
		}
	}
	if n, err := other.EndSessions(context.Background()); err != nil || n != 3 {
		t.Fatalf("ending all: %d %v", n, err)
	}
	for _, cookie := range []*http.Cookie{ops, p2} {
		if w := get(c, "/ui/instances", cookie); !signedOut(w) {
			t.Fatalf("a session after all ended: %d", w.Code)
		}
	}
	u, _ := url.Parse(link)
	if w := post(c, "/ui/login", url.Values{"code": {u.Query().Get("code")}}, "same-origin", nil); w.Code != http.StatusUnauthorized {
		t.Fatalf("a link after all ended: %d", w.Code)
	}
}

// An open page's live stream ends at its next event once its session is
// ended.
func TestLiveEndsWithSession(t *testing.T) {
	c, st, _ := testConsole(t)
	srv := httptest.NewServer(c.Handler())
	t.Cleanup(srv.Close)
	session := signIn(t, c, Viewer{Name: "ops"})
	req, _ := http.NewRequest("GET", srv.URL+"/ui/live", nil)
	req.AddCookie(session)
	resp, err := srv.Client().Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("the live stream: %v %v", resp, err)
	}
	defer resp.Body.Close()
	lines := bufio.NewScanner(resp.Body)
	if !lines.Scan() || lines.Text() != "retry: 1000" {
		t.Fatalf("the stream's first line: %q %v", lines.Text(), lines.Err())
	}
	change := func() {
		t.Helper()
		if err := st.Update(context.Background(), func(tx *store.Tx) error {
			return tx.AppendEvent(store.Event{Actor: "t", InstanceID: "i-1", Action: "x"})
		}); err != nil {
			t.Fatal(err)
		}
	}
	change()
	for lines.Scan() && lines.Text() != "event: changed" {
	}
	if lines.Err() != nil {
		t.Fatal(lines.Err())
	}
	if _, err := c.EndSessions(context.Background()); err != nil {
		t.Fatal(err)
	}
	change()
	for lines.Scan() {
		if lines.Text() == "event: changed" {
			t.Fatal("an event after the session ended")
		}
	}
	if lines.Err() != nil {
		t.Fatalf("the stream: %v", lines.Err())
	}
}
