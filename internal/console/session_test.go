package console

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

// Sign-in links and sessions: a link signs in once posted, as whom it
// says, until it expires; a link is not a session, a session not a link;
// another key's, a changed one and an expired one are nobody.
func TestSessions(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	c := New(Config{Key: []byte(strings.Repeat("k", 32)), Now: func() time.Time { return now }})
	other := New(Config{Key: []byte(strings.Repeat("x", 32)), Now: func() time.Time { return now }})
	link, exp := c.Link(Viewer{Name: "ops", Project: "p1"})
	if !exp.Equal(now.Add(LinkTTL)) {
		t.Fatalf("expires %v", exp)
	}
	u, _ := url.Parse(link)
	code := u.Query().Get("code")
	if v, ok := c.verify(code, "link"); !ok || v.Project != "p1" || v.Name != "ops" {
		t.Fatalf("the link: %+v %v", v, ok)
	}
	if _, ok := c.verify(code, "session"); ok {
		t.Fatal("a link taken as a session")
	}
	if _, ok := other.verify(code, "link"); ok {
		t.Fatal("another key's link taken")
	}
	body, sig, _ := strings.Cut(code, ".")
	if _, ok := c.verify(body+"A."+sig, "link"); ok {
		t.Fatal("a changed link taken")
	}

	// Signing in: a session cookie as the link said; then the link's
	// time runs out, and the session's.
	w := httptest.NewRecorder()
	r := httptest.NewRequest("POST", "/ui/login", strings.NewReader(url.Values{"code": {code}}.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	c.Handler().ServeHTTP(w, r)
	cookies := w.Result().Cookies()
	if w.Code != http.StatusSeeOther || len(cookies) != 1 || cookies[0].MaxAge <= 0 || !cookies[0].HttpOnly {
		t.Fatalf("signing in: %d %v", w.Code, cookies)
	}
	r = httptest.NewRequest("GET", "/ui/", nil)
	r.AddCookie(cookies[0])
	if v, ok := c.session(r); !ok || v.Project != "p1" {
		t.Fatalf("the session: %+v %v", v, ok)
	}
	now = now.Add(LinkTTL)
	if _, ok := c.verify(code, "link"); ok {
		t.Fatal("an expired link taken")
	}
	if _, ok := c.session(r); !ok {
		t.Fatal("the session ended with the link")
	}
	now = now.Add(12 * time.Hour)
	if _, ok := c.session(r); ok {
		t.Fatal("an expired session taken")
	}
	w = httptest.NewRecorder()
	c.Handler().ServeHTTP(w, r)
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/ui/login" {
		t.Fatalf("a page with an expired session: %d %s", w.Code, w.Header().Get("Location"))
	}
}
