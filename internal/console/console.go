// Package console is vtpmd's web console at /ui/: the fleet's trust
// state for the operator, and each project's instances for its tenants,
// as server-rendered pages (html/template, which escapes every value for
// where it lands) over the same store the API reads.
//
// It is served by the API server, same origin, and sees what the API
// lets the viewer see: a tenant its project's instances and policies
// (another project's instance is not found), the operator everything and
// the fleet. Who the viewer is comes from what a browser can prove:
//
//   - a TLS client certificate, checked as the API checks it
//     (Config.Authenticate, the API server's rules);
//   - a session cookie (HttpOnly, SameSite=Strict, Secure over TLS) got by
//     a sign-in link the operator makes on its local socket
//     (`vtpmctl console`; Console.Link), for itself or scoped to one
//     project, or by a Keystone password (Config.SignIn). Links and
//     sessions are rows of the store, found by their secret's hash, so
//     that signing out ends a session on every replica, and the operator
//     can end them all (Console.EndSessions; session.go).
//
// Safety: a Content-Security-Policy with no 'unsafe-inline' (no inline
// script, style or handler anywhere; the one script and stylesheet are
// embedded files served under content-hashed names), cross-origin
// protection (net/http's CrossOriginProtection: Sec-Fetch-Site and
// Origin) on every form that changes anything (sign-in, sign-out), no
// secret rendered (secret ids, tokens and key material never reach a
// page). Pages update live: the page's live region is fetched again
// when the store commits a change to a vTPM or an event (Server-Sent
// Events from /ui/live, see live.go).
package console

import (
	"bytes"
	"context"
	"embed"
	"errors"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
)

// Viewer is who looks at the console.
type Viewer struct {
	// Name is who proved it: a certificate's common name, a user.
	Name string
	// Project is the one project the viewer sees; "" for the operator,
	// who sees every project and the fleet.
	Project string
}

// Operator reports whether v sees everything.
func (v Viewer) Operator() bool { return v.Project == "" }

// Label names v in the page's header.
func (v Viewer) Label() string {
	who := "operator"
	if v.Project != "" {
		who = "project " + v.Project
	}
	if v.Name != "" {
		who += " (" + v.Name + ")"
	}
	return who
}

// Config is what the console reads and how it knows its viewers.
type Config struct {
	Store    *store.Store
	VTPMs    *vtpms.Service
	Verifier *verifier.Verifier
	// Authenticate names a request's viewer by what the API accepts from
	// a browser (a client certificate): ok false when the request proves
	// nobody that way, an error when what it carries is refused.
	Authenticate func(*http.Request) (v Viewer, ok bool, err error)
	// SignIn exchanges a user's password for a Keystone token (for a
	// project by name, or the system when project is ""): the password
	// sign-in form; nil for none. The token is kept in a cookie and
	// authenticates each page through Authenticate, as an API call's.
	SignIn func(ctx context.Context, user, password, project, domain string) (token string, err error)
	// SignOut revokes the Keystone token of a session SignIn started,
	// when it ends by signing out.
	SignOut func(ctx context.Context, token string) error
	// PublicURL is the API's URL as browsers reach it (sign-in links are
	// made absolute with it); "" leaves them relative.
	PublicURL string
	// SessionTTL is how long a session lasts from sign-in. Default 12h.
	SessionTTL time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Log (nil: silent) records the pages that failed.
	Log *slog.Logger
}

// Console serves the web console.
type Console struct {
	cfg   Config
	pages map[string]*template.Template
	// closing is closed by Close: live streams end.
	closing   chan struct{}
	closeOnce sync.Once
}

//go:embed templates
var templateFiles embed.FS

// New makes a console.
func New(cfg Config) *Console {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.SessionTTL == 0 {
		cfg.SessionTTL = 12 * time.Hour
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Console{cfg: cfg, pages: parsePages(), closing: make(chan struct{})}
}

// Close ends the live streams (http.Server.RegisterOnShutdown), so that a
// graceful shutdown need not wait for them.
func (c *Console) Close() { c.closeOnce.Do(func() { close(c.closing) }) }

// parsePages parses each page's template with the layout.
func parsePages() map[string]*template.Template {
	layout := template.Must(template.New("layout.html").Funcs(funcs).ParseFS(templateFiles, "templates/layout.html"))
	names, err := fs.Glob(templateFiles, "templates/*.html")
	if err != nil {
		panic(err)
	}
	pages := map[string]*template.Template{}
	for _, n := range names {
		if n == "templates/layout.html" {
			continue
		}
		pages[n[len("templates/"):]] = template.Must(template.Must(layout.Clone()).ParseFS(templateFiles, n))
	}
	return pages
}

// Handler serves the console under /ui/.
func (c *Console) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /ui/assets/{name}", http.HandlerFunc(serveAsset))
	mux.Handle("GET /ui/login", c.page(c.loginPage, false))
	mux.Handle("POST /ui/login", c.page(c.signIn, false))
	mux.Handle("POST /ui/logout", c.page(c.signOut, false))
	mux.Handle("GET /ui/{$}", c.page(c.home, true))
	mux.Handle("GET /ui/fleet", c.page(c.fleet, true))
	mux.Handle("GET /ui/instances", c.page(c.instances, true))
	mux.Handle("GET /ui/instances/{id}", c.page(c.instance, true))
	mux.Handle("GET /ui/policies", c.page(c.policies, true))
	mux.Handle("GET /ui/policies/{id}", c.page(c.policy, true))
	mux.Handle("GET /ui/live", c.page(c.live, true))
	mux.Handle("/ui/", c.page(func(*request) error { return errNoPage }, false))
	protect := http.NewCrossOriginProtection()
	return secure(protect.Handler(mux))
}

// contentSecurityPolicy allows the console's own script, stylesheet and
// connections, nothing inline, nothing from elsewhere, no framing.
const contentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
	"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

// secure sets the headers every console response carries.
func secure(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Content-Security-Policy", contentSecurityPolicy)
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("Referrer-Policy", "no-referrer") // a sign-in link's code stays here
		hd.Set("X-Frame-Options", "DENY")
		h.ServeHTTP(w, r)
	})
}

// request is one page request: who asks, and what to answer with.
type request struct {
	w      http.ResponseWriter
	r      *http.Request
	viewer Viewer
}

func (q *request) ctx() context.Context { return q.r.Context() }

// errNoPage is a path the console has no page for.
var errNoPage = errors.New("no such page")

// page serves h, after naming the viewer when the page needs one (a
// browser that proved nobody is sent to sign in).
func (c *Console) page(h func(*request) error, needsViewer bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := &request{w: w, r: r}
		var err error
		if needsViewer {
			var ok bool
			if q.viewer, ok, err = c.viewer(r); err == nil && !ok {
				http.Redirect(w, r, "/ui/login", http.StatusSeeOther)
				return
			}
		}
		if err == nil {
			err = h(q)
		}
		if err != nil && r.Context().Err() == nil {
			c.fail(q, err)
		}
	})
}

// viewer names the request's viewer: its session (a Keystone session's
// token authenticated as an API call's), else its client certificate. A
// token Keystone no longer accepts is nobody: the browser is sent to sign
// in again.
func (c *Console) viewer(r *http.Request) (Viewer, bool, error) {
	s, token, ok, err := c.session(r)
	switch {
	case err != nil:
		return Viewer{}, false, err
	case ok && s.Kind == store.SessionKeystone:
		v, err := c.keystoneViewer(r, token)
		var re *refusal.Error
		if errors.As(err, &re) && re.Kind == refusal.KindUnauthenticated {
			return Viewer{}, false, nil
		}
		return v, err == nil, err
	case ok && s.Kind == store.SessionSigned:
		return Viewer{Name: s.Name, Project: s.Project}, true, nil
	case c.cfg.Authenticate == nil:
		return Viewer{}, false, nil
	}
	return c.cfg.Authenticate(r)
}

// fail answers err as an error page: not found for what the viewer may
// not see as for what does not exist, the refusal's words for the other
// refusals, and a generic message (the error logged) for the rest.
func (c *Console) fail(q *request, err error) {
	status, msg := http.StatusInternalServerError, "Something went wrong on the server; its log says what."
	var re *refusal.Error
	switch {
	case errors.Is(err, errNoPage), errors.Is(err, store.ErrNotFound):
		status, msg = http.StatusNotFound, "There is no such page, or it is not yours to see."
	case errors.As(err, &re):
		switch re.Kind {
		case refusal.KindNotFound:
			status, msg = http.StatusNotFound, "There is no such page, or it is not yours to see."
		case refusal.KindUnauthenticated:
			status, msg = http.StatusUnauthorized, re.Message
		case refusal.KindForbidden:
			status, msg = http.StatusForbidden, re.Message
		case refusal.KindInvalid:
			status, msg = http.StatusBadRequest, re.Message
		default:
			status, msg = http.StatusServiceUnavailable, re.Message
		}
	default:
		c.cfg.Log.Error("console page failed", "path", q.r.URL.Path, "err", err)
	}
	c.render(q, status, "error.html", &struct {
		base
		Message string
	}{base{Title: http.StatusText(status), Viewer: q.viewer, SignedIn: q.viewer != Viewer{}}, msg})
}

// base is what every page's layout shows.
type base struct {
	Title    string
	Section  string // the navigation entry marked current
	Viewer   Viewer
	SignedIn bool
	// Live: the page's live region follows changes (live.go).
	Live bool
}

// render writes page with data.
func (c *Console) render(q *request, status int, page string, data any) {
	var b bytes.Buffer
	if err := c.pages[page].ExecuteTemplate(&b, "layout.html", data); err != nil {
		c.cfg.Log.Error("rendering a console page", "page", page, "err", err)
		http.Error(q.w, "The page could not be rendered; the server's log says why.", http.StatusInternalServerError)
		return
	}
	h := q.w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Length", strconv.Itoa(b.Len()))
	q.w.WriteHeader(status)
	q.w.Write(b.Bytes())
}
