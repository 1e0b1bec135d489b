package server

import (
	"net/http"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/console"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// BrowserViewer names the console's viewer with the API's own rules
// (authenticate): a client certificate, which browsers present natively;
// the operator's socket; a Keystone token in api.TokenHeader (which a
// browser does not send, but a proxy in front may). A request with none
// proves nobody here (ok false), and the console asks it to sign in.
func (s *Server) BrowserViewer(r *http.Request) (console.Viewer, bool, error) {
	_, local := callerOf(r)
	token := r.Header.Get(api.TokenHeader) != "" && s.Identity != nil
	if !local && !token && (r.TLS == nil || len(r.TLS.VerifiedChains) == 0) {
		return console.Viewer{}, false, nil
	}
	r, err := s.authenticate(r)
	if err != nil {
		return console.Viewer{}, false, err
	}
	c, _ := callerOf(r)
	name := c.name
	if c.user != "" {
		name = c.user
	}
	return console.Viewer{Name: name, Project: c.project}, true, nil
}

// consoleLink makes a sign-in link to the web console (the operator's):
// for the operator's own view, or with ?project= one project's.
func (s *Server) consoleLink(w http.ResponseWriter, r *http.Request) error {
	if s.Console == nil {
		return refusal.NotFound(api.CodeNotFound, "This server serves no web console.")
	}
	project := r.URL.Query().Get("project")
	if project != "" && !tenant.Valid(project) {
		return refusal.Invalid(api.CodeInvalidProject, "Project "+refusal.Quote(project)+" is not a valid project id.")
	}
	c, _ := callerOf(r)
	url, exp, err := s.Console.Link(r.Context(), console.Viewer{Name: c.name, Project: project})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, api.ConsoleLink{URL: url, Project: project, ExpiresAt: exp})
	return nil
}

// endConsoleSessions ends the web console's sessions and unused sign-in
// links (the operator's): every one, or with ?project= that project's.
func (s *Server) endConsoleSessions(w http.ResponseWriter, r *http.Request) error {
	if s.Console == nil {
		return refusal.NotFound(api.CodeNotFound, "This server serves no web console.")
	}
	project := r.URL.Query().Get("project")
	var projects []string
	if project != "" {
		if !tenant.Valid(project) {
			return refusal.Invalid(api.CodeInvalidProject, "Project "+refusal.Quote(project)+" is not a valid project id.")
		}
		projects = append(projects, project)
	}
	n, err := s.Console.EndSessions(r.Context(), projects...)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.ConsoleSessionsEnded{Project: project, Ended: n})
	return nil
}
