package console

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/internal/refusal"
)

// Sign-in links and sessions are signed claims, not rows: any server
// replica with the deployment's key checks them, and a lost one expires.
// A link's claims are kind "link" (good for LinkTTL, to sign in with); a
// session's are kind "session" (good for Config.SessionTTL from sign-in,
// in a cookie the page scripts cannot read). Neither can be revoked
// before it expires but by changing the key.

// LinkTTL is how long a sign-in link may be used.
const LinkTTL = 15 * time.Minute

// cookieName is the session cookie's; tokenCookie keeps a Keystone
// token got by the password form (Config.SignIn).
const (
	cookieName  = "vtpmd_console"
	tokenCookie = "vtpmd_console_token"
)

// claims are what a link or a session says.
type claims struct {
	Kind    string `json:"k"`
	Name    string `json:"n,omitempty"`
	Project string `json:"p,omitempty"`
	Expires int64  `json:"e"`
}

// Link makes a sign-in link for v, valid for LinkTTL: absolute when the
// console knows its public URL. It returns the link and when it expires.
func (c *Console) Link(v Viewer) (string, time.Time) {
	exp := c.cfg.Now().Add(LinkTTL)
	code := c.sign(claims{Kind: "link", Name: v.Name, Project: v.Project, Expires: exp.Unix()})
	return strings.TrimSuffix(c.cfg.PublicURL, "/") + "/ui/login?code=" + url.QueryEscape(code), exp
}

// sign encodes cl with its MAC: base64url(JSON) "." base64url(HMAC).
func (c *Console) sign(cl claims) string {
	body, _ := json.Marshal(cl)
	mac := hmac.New(sha256.New, c.cfg.Key)
	mac.Write(body)
	enc := base64.RawURLEncoding
	return enc.EncodeToString(body) + "." + enc.EncodeToString(mac.Sum(nil))
}

// verify reads a signed value of kind, unexpired; ok false for anything
// else.
func (c *Console) verify(s, kind string) (Viewer, bool) {
	if len(c.cfg.Key) == 0 {
		return Viewer{}, false
	}
	b64, sig, found := strings.Cut(s, ".")
	enc := base64.RawURLEncoding
	body, err1 := enc.DecodeString(b64)
	got, err2 := enc.DecodeString(sig)
	if !found || err1 != nil || err2 != nil {
		return Viewer{}, false
	}
	mac := hmac.New(sha256.New, c.cfg.Key)
	mac.Write(body)
	var cl claims
	if !hmac.Equal(got, mac.Sum(nil)) || json.Unmarshal(body, &cl) != nil || cl.Kind != kind || c.cfg.Now().Unix() >= cl.Expires {
		return Viewer{}, false
	}
	return Viewer{Name: cl.Name, Project: cl.Project}, true
}

// session is the viewer of the request's session cookie, if valid.
func (c *Console) session(r *http.Request) (Viewer, bool) {
	ck, err := r.Cookie(cookieName)
	if err != nil {
		return Viewer{}, false
	}
	return c.verify(ck.Value, "session")
}

// setSession gives the browser a session for v; v == nil ends it, and
// a Keystone token's cookie with it.
func (c *Console) setSession(q *request, v *Viewer) {
	ck := c.cookie(q, cookieName)
	if v == nil {
		ck.MaxAge = -1
		http.SetCookie(q.w, c.cookie(q, tokenCookie))
	} else {
		exp := c.cfg.Now().Add(c.cfg.SessionTTL)
		ck.Value = c.sign(claims{Kind: "session", Name: v.Name, Project: v.Project, Expires: exp.Unix()})
		ck.Expires, ck.MaxAge = exp, int(c.cfg.SessionTTL/time.Second)
	}
	http.SetCookie(q.w, ck)
}

// cookie is a console cookie named name, as every one is set: for /ui/
// alone, out of scripts' reach, never sent from another site, over TLS
// only when the console is served over TLS. As it is, it ends one.
func (c *Console) cookie(q *request, name string) *http.Cookie {
	return &http.Cookie{Name: name, Path: "/ui/", HttpOnly: true, Secure: q.r.TLS != nil, SameSite: http.SameSiteStrictMode, MaxAge: -1}
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
		v, ok := c.verify(code, "link")
		data.Bad, data.As = !ok, v.Label()
	}
	c.render(q, http.StatusOK, "login.html", data)
	return nil
}

// signIn exchanges a link's code for a session, or a user's password for
// a Keystone token kept in a cookie.
func (c *Console) signIn(q *request) error {
	q.r.Body = http.MaxBytesReader(q.w, q.r.Body, 16<<10)
	if q.r.PostFormValue("password") != "" && c.cfg.SignIn != nil {
		return c.passwordSignIn(q)
	}
	v, ok := c.verify(q.r.PostFormValue("code"), "link")
	if !ok {
		c.render(q, http.StatusUnauthorized, "login.html", &loginData{base: base{Title: "Sign in"}, Bad: true, Password: c.cfg.SignIn != nil, Domain: "Default"})
		return nil
	}
	c.setSession(q, &v)
	http.Redirect(q.w, q.r, "/ui/", http.StatusSeeOther)
	return nil
}

// passwordSignIn asks Keystone for a token for the form's user, password
// and project, and keeps the token (never the password) in a cookie.
func (c *Console) passwordSignIn(q *request) error {
	f := q.r.PostForm
	data := &loginData{base: base{Title: "Sign in"}, Password: true, User: f.Get("user"), Project: f.Get("project"), Domain: f.Get("domain")}
	token, err := c.cfg.SignIn(q.ctx(), data.User, f.Get("password"), data.Project, data.Domain)
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
	ck := c.cookie(q, tokenCookie)
	ck.Value, ck.MaxAge = token, int(c.cfg.SessionTTL/time.Second)
	http.SetCookie(q.w, ck)
	http.Redirect(q.w, q.r, "/ui/", http.StatusSeeOther)
	return nil
}

// signOut ends the session.
func (c *Console) signOut(q *request) error {
	c.setSession(q, nil)
	http.Redirect(q.w, q.r, "/ui/login", http.StatusSeeOther)
	return nil
}
