package console

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
)

// Sign-in links and sessions are rows of the store (store.ConsoleSession),
// each found by the SHA-256 of its secret: the secret itself (a link's
// code, a cookie) is only ever in the browser. Every server replica
// sharing the store checks every one on each request, so that signing out
// (deleting the row) ends a session on all of them at once, and the
// operator can end every session, or a project's, the same way
// (EndSessions). A link is used once, within LinkTTL; a session lasts
// Config.SessionTTL from sign-in, in a cookie the page scripts cannot
// read.

// LinkTTL is how long a sign-in link may be used.
const LinkTTL = 15 * time.Minute

// cookieName is the session cookie's: a session's secret, or the Keystone
// token a password sign-in got (Config.SignIn).
const cookieName = "vtpmd_console"

// secretHash is what the store keeps of a link's code or a cookie.
func secretHash(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

// newSecret is 32 random bytes, in base64url.
func newSecret() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// Link makes a sign-in link for v, to be used once within LinkTTL:
// absolute when the console knows its public URL. It returns the link
// and when it expires.
func (c *Console) Link(ctx context.Context, v Viewer) (string, time.Time, error) {
	code := newSecret()
	s := &store.ConsoleSession{TokenHash: secretHash(code), Kind: store.SessionLink, Name: v.Name, Project: v.Project}
	if err := c.cfg.Store.Update(ctx, func(tx *store.Tx) error { return tx.CreateConsoleSession(s, LinkTTL) }); err != nil {
		return "", time.Time{}, err
	}
	return strings.TrimSuffix(c.cfg.PublicURL, "/") + "/ui/login?code=" + url.QueryEscape(code), s.ExpiresAt, nil
}

// EndSessions ends the sessions and unused sign-in links of the given
// projects ("" is the operator's), every one when none is given, on every
// server replica; it says how many it ended.
func (c *Console) EndSessions(ctx context.Context, projects ...string) (n int, err error) {
	err = c.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) { n, err = tx.EndConsoleSessions(projects...); return err })
	return n, err
}

// session is the request's session, if its cookie names an unexpired one;
// ok false for none.
func (c *Console) session(r *http.Request) (s *store.ConsoleSession, secret string, ok bool, err error) {
	ck, err := r.Cookie(cookieName)
	if err != nil || ck.Value == "" {
		return nil, "", false, nil
	}
	err = c.cfg.Store.View(r.Context(), func(tx *store.Tx) (err error) { s, err = tx.GetConsoleSession(secretHash(ck.Value)); return err })
	switch {
	case errors.Is(err, store.ErrNotFound), err == nil && s.Kind == store.SessionLink:
		return nil, "", false, nil
	case err != nil:
		return nil, "", false, err
	}
	return s, ck.Value, true, nil
}

// startSession gives the browser a session of kind for v; its cookie
// holds secret.
func (c *Console) startSession(q *request, kind store.SessionKind, v Viewer, secret string) error {
	s := &store.ConsoleSession{TokenHash: secretHash(secret), Kind: kind, Name: v.Name, Project: v.Project}
	if err := c.cfg.Store.Update(q.ctx(), func(tx *store.Tx) error { return tx.CreateConsoleSession(s, c.cfg.SessionTTL) }); err != nil {
		return err
	}
	ck := c.cookie(q)
	ck.Value, ck.Expires, ck.MaxAge = secret, s.ExpiresAt, int(c.cfg.SessionTTL/time.Second)
	http.SetCookie(q.w, ck)
	return nil
}

// cookie is the session cookie as it is always set: for /ui/ alone, out
// of scripts' reach, never sent from another site, over TLS only when the
// console is served over TLS. As it is, it ends one.
func (c *Console) cookie(q *request) *http.Cookie {
	return &http.Cookie{Name: cookieName, Path: "/ui/", HttpOnly: true, Secure: q.r.TLS != nil, SameSite: http.SameSiteStrictMode, MaxAge: -1}
}

// loginData is what the sign-in page shows.
type loginData struct {
	base
	Code     string // a link's code, to sign in with
	As       string // whom it signs in as
	Bad      bool   // the link is not valid
	Password bool   // the Keystone password form is offered
	Failed   string // why the password sign-in failed
	User     string
	Project  string
	Domain   string
}

// loginPage shows how to sign in; with a link's code, a button that
// signs in with it (a POST: following a link alone changes nothing).
func (c *Console) loginPage(q *request) error {
	code := q.r.URL.Query().Get("code")
	data := &loginData{base: base{Title: "Sign in"}, Code: code, Password: c.cfg.SignIn != nil, Domain: "Default"}
	if code != "" {
		var s *store.ConsoleSession
		err := c.cfg.Store.View(q.ctx(), func(tx *store.Tx) (err error) { s, err = tx.GetConsoleSession(secretHash(code)); return err })
		switch {
		case errors.Is(err, store.ErrNotFound) || err == nil && s.Kind != store.SessionLink:
			data.Bad = true
		case err != nil:
			return err
		default:
			data.As = Viewer{Name: s.Name, Project: s.Project}.Label()
		}
	}
	c.render(q, http.StatusOK, "login.html", data)
	return nil
}

// signIn exchanges a link's code for a session (the link is used up), or
// a user's password for a Keystone token kept in a cookie.
func (c *Console) signIn(q *request) error {
	q.r.Body = http.MaxBytesReader(q.w, q.r.Body, 16<<10)
	if q.r.PostFormValue("password") != "" && c.cfg.SignIn != nil {
		return c.passwordSignIn(q)
	}
	var link *store.ConsoleSession
	err := c.cfg.Store.Update(q.ctx(), func(tx *store.Tx) (err error) {
		link, err = tx.TakeConsoleSession(secretHash(q.r.PostFormValue("code")), store.SessionLink)
		return err
	})
	if errors.Is(err, store.ErrNotFound) {
		c.render(q, http.StatusUnauthorized, "login.html", &loginData{base: base{Title: "Sign in"}, Bad: true, Password: c.cfg.SignIn != nil, Domain: "Default"})
		return nil
	}
	if err != nil {
		return err
	}
	if err := c.startSession(q, store.SessionSigned, Viewer{Name: link.Name, Project: link.Project}, newSecret()); err != nil {
		return err
	}
	http.Redirect(q.w, q.r, "/ui/", http.StatusSeeOther)
	return nil
}

// passwordSignIn asks Keystone for a token for the form's user, password
// and project, and keeps the token (never the password) in the session's
// cookie; the store keeps its hash, and whom Keystone says it names.
func (c *Console) passwordSignIn(q *request) error {
	f := q.r.PostForm
	data := &loginData{base: base{Title: "Sign in"}, Password: true, User: f.Get("user"), Project: f.Get("project"), Domain: f.Get("domain")}
	token, err := c.cfg.SignIn(q.ctx(), data.User, f.Get("password"), data.Project, data.Domain)
	var v Viewer
	if err == nil {
		v, err = c.keystoneViewer(q.r, token)
	}
	var re *refusal.Error
	if errors.As(err, &re) {
		data.Failed = re.Message
		status := http.StatusUnauthorized
		if re.Kind == refusal.KindUnavailable {
			status = http.StatusServiceUnavailable
		}
		c.render(q, status, "login.html", data)
		return nil
	}
	if err != nil {
		return err
	}
	if err := c.startSession(q, store.SessionKeystone, v, token); err != nil {
		return err
	}
	http.Redirect(q.w, q.r, "/ui/", http.StatusSeeOther)
	return nil
}

// keystoneViewer names the viewer of a Keystone token as the API would
// (Config.Authenticate, the token in api.TokenHeader).
func (c *Console) keystoneViewer(r *http.Request, token string) (Viewer, error) {
	if c.cfg.Authenticate == nil {
		return Viewer{}, refusal.Unauthenticated(api.CodeUnauthenticated, "This console authenticates no Keystone token.")
	}
	r = r.Clone(r.Context())
	r.Header.Set(api.TokenHeader, token)
	v, ok, err := c.cfg.Authenticate(r)
	if err == nil && !ok {
		err = refusal.Unauthenticated(api.CodeUnauthenticated, "Keystone's token names nobody this server knows.")
	}
	return v, err
}

// signOut ends the request's session on every replica, revokes its
// Keystone token if it has one, and drops its cookie.
func (c *Console) signOut(q *request) error {
	if ck, err := q.r.Cookie(cookieName); err == nil {
		var ended *store.ConsoleSession
		err := c.cfg.Store.Update(q.ctx(), func(tx *store.Tx) (err error) {
			ended, err = tx.GetConsoleSession(secretHash(ck.Value)) // nil if expired
			if err != nil && !errors.Is(err, store.ErrNotFound) {
				return err
			}
			return tx.EndConsoleSession(secretHash(ck.Value))
		})
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		// A password sign-in's token (the cookie) is revoked in Keystone
		// too; the session is over here whatever Keystone answers.
		if ended != nil && ended.Kind == store.SessionKeystone && c.cfg.SignOut != nil {
			if err := c.cfg.SignOut(q.ctx(), ck.Value); err != nil {
				c.cfg.Log.Warn("signed out of the console; Keystone did not revoke the session's token", "err", err)
			}
		}
	}
	http.SetCookie(q.w, c.cookie(q))
	http.Redirect(q.w, q.r, "/ui/login", http.StatusSeeOther)
	return nil
}
