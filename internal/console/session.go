package console

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Sign-in links and sessions are signed claims, not rows: any server
// replica with the deployment's key checks them, and a lost one expires.
// A link's claims are kind "link" (good for LinkTTL, to sign in with); a
// session's are kind "session" (good for Config.SessionTTL from sign-in,
// in a cookie the page scripts cannot read). Neither can be revoked
// before it expires but by changing the key.

// LinkTTL is how long a sign-in link may be used.
const LinkTTL = 15 * time.Minute

// cookieName is the session cookie's.
const cookieName = "vtpmd_console"

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

// setSession gives the browser a session for v; v == nil ends it.
func (c *Console) setSession(q *request, v *Viewer) {
	ck := &http.Cookie{Name: cookieName, Path: "/ui/", HttpOnly: true, Secure: q.r.TLS != nil, SameSite: http.SameSiteStrictMode}
	if v == nil {
		ck.MaxAge = -1
	} else {
		exp := c.cfg.Now().Add(c.cfg.SessionTTL)
		ck.Value = c.sign(claims{Kind: "session", Name: v.Name, Project: v.Project, Expires: exp.Unix()})
		ck.Expires = exp
	}
	http.SetCookie(q.w, ck)
}

// loginPage shows how to sign in; with a link's code, a button that
// signs in with it (a POST: following a link alone changes nothing).
func (c *Console) loginPage(q *request) error {
	code := q.r.URL.Query().Get("code")
	data := &struct {
		base
		Code string
		As   string
		Bad  bool
	}{base: base{Title: "Sign in"}, Code: code}
	if code != "" {
		v, ok := c.verify(code, "link")
		data.Bad, data.As = !ok, v.Label()
	}
	c.render(q, http.StatusOK, "login.html", data)
	return nil
}

// signIn exchanges a link's code for a session.
func (c *Console) signIn(q *request) error {
	q.r.Body = http.MaxBytesReader(q.w, q.r.Body, 16<<10)
	v, ok := c.verify(q.r.PostFormValue("code"), "link")
	if !ok {
		c.render(q, http.StatusUnauthorized, "login.html", &struct {
			base
			Code, As string
			Bad      bool
		}{base: base{Title: "Sign in"}, Bad: true})
		return nil
	}
	c.setSession(q, &v)
	http.Redirect(q.w, q.r, "/ui/", http.StatusSeeOther)
	return nil
}

// signOut ends the session.
func (c *Console) signOut(q *request) error {
	c.setSession(q, nil)
	http.Redirect(q.w, q.r, "/ui/login", http.StatusSeeOther)
	return nil
}
