package server

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keystone"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// Tokens validates Keystone tokens: *keystone.Validator, which caches
// Keystone's answers for a bounded time.
type Tokens interface {
	Validate(ctx context.Context, token string) (*keystone.Token, error)
}

var _ Tokens = (*keystone.Validator)(nil)

// Identity is Keystone authentication of tenants and the operator.
type Identity struct {
	Tokens Tokens
	// AdminProject is the project whose admins are the operator, by ID or
	// by name in the Default domain (Keystone's bootstrap "admin").
	AdminProject string
	// URL is Keystone's identity API, where the web console's password
	// sign-in asks for tokens (KeystoneSignIn).
	URL string
	// Client reaches Keystone for the console's sign-in and sign-out,
	// trusting the CA the service credentials name; nil: a plain client.
	Client *http.Client
}

// client is how the console's sign-in and sign-out reach Keystone.
func (id *Identity) client() *http.Client {
	if id.Client != nil {
		return id.Client
	}
	return &http.Client{Timeout: 10 * time.Second}
}

// KeystoneSignIn gets a Keystone token for a user's password, scoped to
// project (by name, in domain) or, with no project, to the system: the
// web console's password sign-in, whose token then authenticates the
// browser's pages as it would an API call. The password goes to Keystone
// and nowhere else.
func (s *Server) KeystoneSignIn(ctx context.Context, user, password, project, domain string) (string, error) {
	if s.Identity == nil || s.Identity.URL == "" {
		return "", refusal.NotFound(api.CodeNotFound, "This server does not authenticate with Keystone.")
	}
	if user == "" || password == "" {
		return "", refusal.Invalid(api.CodeInvalidParameter, "A user name and a password are needed.")
	}
	if domain == "" {
		domain = "Default"
	}
	creds := keystone.Credentials{AuthURL: s.Identity.URL, Username: user, Password: password, UserDomainName: domain,
		ProjectName: project, ProjectDomainName: domain}
	if project == "" {
		creds.SystemScope = "all"
	}
	token, err := keystone.NewSession(creds, s.Identity.client()).Token(ctx)
	switch {
	case errors.Is(err, keystone.ErrBadCredentials):
		return "", refusal.Unauthenticated(api.CodeUnauthenticated, "Keystone did not accept that user, password and project.")
	case errors.Is(err, keystone.ErrUnavailable):
		s.Log.Warn("keystone cannot sign a console user in", "err", err)
		return "", refusal.Unavailable(api.CodeIdentityUnavailable, "Keystone cannot be reached now; try again shortly.")
	}
	return token, err
}

// KeystoneSignOut revokes the token of a console session signed in with
// a password, as the user signing out: the token the browser held is then
// good for nothing anywhere, as "openstack token revoke" would leave it.
func (s *Server) KeystoneSignOut(ctx context.Context, token string) error {
	if s.Identity == nil || s.Identity.URL == "" {
		return nil
	}
	return keystone.Revoke(ctx, s.Identity.client(), s.Identity.URL, token)
}

// fromToken authenticates r by its Keystone token and maps the token's
// scope and roles to a caller, as OpenStack's default policies do:
//
//   - admin scoped to the system, or to the admin project: the operator;
//   - reader (or member) scoped to the system: the operator, reading only;
//   - member scoped to a project: reads, changes and creates vTPMs there
//     (an admin of any other project is a member of it, no more);
//   - reader scoped to a project: reads there;
//   - any other role, or a domain-scoped or unscoped token: 403.
//
// A token Keystone does not accept is 401; Keystone unable to answer is
// 503 identity_unavailable. The token travels on in r's context
// (keyring.WithToken) for key managers that act as the caller.
func (s *Server) fromToken(r *http.Request, token string) (*http.Request, error) {
	t, err := s.Identity.Tokens.Validate(r.Context(), token)
	switch {
	case errors.Is(err, keystone.ErrInvalidToken):
		return r, refusal.Unauthenticated(api.CodeUnauthenticated, "The "+api.TokenHeader+" token is not valid: Keystone does not know it, or it expired or was revoked. Get a new one.")
	case errors.Is(err, keystone.ErrUnavailable):
		s.Log.Warn("keystone cannot validate a token", "method", r.Method, "path", r.URL.Path, "err", err)
		return r, refusal.Unavailable(api.CodeIdentityUnavailable, "Keystone cannot validate the token now; the request was not carried out. Retry it shortly.")
	case err != nil:
		return r, err
	}
	c := caller{user: t.User.Name}
	if c.user == "" {
		c.user = t.User.ID
	}
	switch {
	case t.System && t.HasRole("admin"):
		c.operator, c.rights = true, allRights
	case t.System && (t.HasRole("reader") || t.HasRole("member")):
		c.operator, c.rights = true, reads
	case t.System:
		// no role vtpmd knows: c.rights stays 0, every route 403
		c.operator = true
	case t.Project.ID == "":
		return r, refusal.Forbidden(api.CodeForbidden, "The Keystone token is not scoped to a project or the system: get one with a project (OS_PROJECT_NAME) or system scope (OS_SYSTEM_SCOPE=all).")
	case t.HasRole("admin") && s.Identity.isAdminProject(t.Project):
		c.operator, c.rights = true, allRights
	case !tenant.Valid(t.Project.ID):
		return r, refusal.Forbidden(api.CodeInvalidProject, "The Keystone token's project id "+refusal.Quote(t.Project.ID)+" is not one vtpmd takes.")
	case t.HasRole("member") || t.HasRole("admin"):
		c.project, c.rights = t.Project.ID, allRights
	case t.HasRole("reader"):
		c.project, c.rights = t.Project.ID, reads
	default:
		c.project = t.Project.ID
	}
	ctx := keyring.WithToken(context.WithValue(r.Context(), callerKey{}, c), token)
	return r.WithContext(ctx), nil
}

// isAdminProject reports whether p is the operator's project.
func (id *Identity) isAdminProject(p keystone.Named) bool {
	return p.ID == id.AdminProject || (p.Name == id.AdminProject && p.DomainID == "default")
}
