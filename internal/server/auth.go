package server

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os/user"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// access says who may call a route.
type access int

const (
	// callers are tenants and the operator: the operator on the local API
	// socket (OperatorConn), or either by client certificate.
	callers access = iota
	// operator is the operator alone: a tenant, or the operator scoped to
	// a project with api.ProjectHeader, is refused.
	operator
	// agents are guest and host agents: the handler checks their bearer
	// token or host credential, or the route needs none (a registration
	// is proven by the TPM itself).
	agents
	// anyone may read public documents: health, OpenAPI, CA, verdict keys.
	anyone
	// hosts are hosts' agents by the client certificate they got at
	// enrolment (hostOf), checked against the store on every request.
	hosts
)

// OperatorOrganization in a client certificate's subject makes its holder
// the operator. It cannot be a project id (no colons in those).
const OperatorOrganization = "system:operator"

// caller is who an authenticated request comes from.
type caller struct {
	name     string // the certificate's common name or the local user, for the event log
	user     string // the Keystone user's name, for the event log
	project  string // the project a tenant acts in; "" for the operator
	operator bool
	rights   rights // what the caller may do in its scope
}

// rights are what a caller may do in its scope (its project, or every
// project for the operator). The operator and a Keystone admin have all;
// a tenant's client certificate reads and changes its project's
// resources but does not create vTPMs (the cloud, as the operator, does);
// a Keystone member does that too, as Nova does with the user's token; a
// Keystone reader reads.
type rights uint8

const (
	// reads is every GET, and POST /v1/resolve.
	reads rights = 1 << iota
	// changes is every other route but POST /v1/vtpms: delete, start,
	// stop, attach, policies, secrets, refreshes.
	changes
	// createsVTPMs is POST /v1/vtpms.
	createsVTPMs

	allRights = reads | changes | createsVTPMs
)

// needs is the right rt asks of its caller.
func (rt route) needs() rights {
	switch {
	case rt.pattern == "POST /v1/vtpms":
		return createsVTPMs
	case strings.HasPrefix(rt.pattern, "GET "), rt.pattern == "POST /v1/resolve":
		return reads
	}
	return changes
}

type callerKey struct{}

// OperatorConn is the http.Server ConnContext of the operator's local API
// socket: whoever can connect to that unix socket is the operator, so its
// file permissions are the access control (as with docker.sock). The peer's
// uid names the operator in the event log. Any other kind of connection
// gets no identity here: TCP callers prove theirs with a certificate.
func OperatorConn(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	return context.WithValue(ctx, callerKey{}, caller{operator: true, name: peerName(uc), rights: allRights})
}

// peerName names the local user at the other end of a unix connection.
func peerName(c *net.UnixConn) string {
	raw, err := c.SyscallConn()
	if err != nil {
		return "local socket"
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) { cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if err != nil || cred == nil {
		return "local socket"
	}
	uid := strconv.FormatUint(uint64(cred.Uid), 10)
	if u, err := user.LookupId(uid); err == nil {
		return fmt.Sprintf("uid %s %s", uid, u.Username)
	}
	return "uid " + uid
}

// authenticate names the caller of a tenants' and operator's route: the
// operator on the local socket; with Keystone authentication, the holder
// of a valid token in api.TokenHeader (fromToken), which then decides even if
// a certificate came too; or the holder of a client certificate that the
// TLS server verified against the deployment's client CAs, whose
// subject's organization is the tenant's project or OperatorOrganization.
// Nobody else is anyone: there is no unauthenticated operator or tenant.
func (s *Server) authenticate(r *http.Request) (*http.Request, error) {
	if _, ok := callerOf(r); ok {
		return r, nil // the local socket
	}
	if token := r.Header.Get(api.TokenHeader); token != "" && s.Identity != nil {
		return s.fromToken(r, token)
	}
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
		if s.Identity != nil {
			return r, refusal.Unauthenticated(api.CodeUnauthenticated,
				"This API needs a Keystone token ("+api.TokenHeader+"; vtpmctl --os-cloud or OS_* variables), a client certificate (vtpmctl --cert and --key), or the operator's local socket.")
		}
		return r, refusal.Unauthenticated(api.CodeUnauthenticated,
			"This API needs a client certificate (vtpmctl --cert and --key), or the operator's local socket (vtpmctl --server unix://DATA-DIR/api.sock).")
	}
	leaf := r.TLS.VerifiedChains[0][0]
	if s.Enrolment.Issued(leaf) {
		return r, refusal.Forbidden(api.CodeForbidden, "A host certificate is for its agent's routes (/v1/agent/...), not tenants' or the operator's.")
	}
	c := caller{name: leaf.Subject.CommonName, rights: reads | changes}
	switch org := leaf.Subject.Organization; {
	case len(org) == 1 && org[0] == OperatorOrganization:
		c.operator, c.rights = true, allRights
	case len(org) == 1 && tenant.Valid(org[0]):
		c.project = org[0]
	default:
		return r, refusal.Forbidden(api.CodeForbidden, "The client certificate names no project: its subject needs one organization, the project id (or "+OperatorOrganization+").")
	}
	return r.WithContext(context.WithValue(r.Context(), callerKey{}, c)), nil
}

type hostKey struct{}

// hostOf authenticates the host's agent of a hosts' route by the client
// certificate the TLS server verified: one the host CA issued, whose
// serial the store holds unrevoked (enrol.Service.Authenticate), names the
// host. The host comes from the certificate alone, never from the path or
// body. It returns the request carrying the host (see hostName).
func (s *Server) hostOf(r *http.Request) (*http.Request, error) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
		return r, refusal.Unauthenticated(api.CodeUnauthenticated,
			"This is a host's route: it needs the client certificate the host's agent got at enrolment (POST /v1/agent/enroll).")
	}
	host, err := s.Enrolment.Authenticate(r.Context(), r.TLS.VerifiedChains[0][0])
	if err != nil {
		return r, err
	}
	return r.WithContext(context.WithValue(r.Context(), hostKey{}, host)), nil
}

// hostName is the host hostOf authenticated for r.
func hostName(r *http.Request) string {
	h, _ := r.Context().Value(hostKey{}).(string)
	return h
}

// callerOf is the authenticated caller of r, if any.
func callerOf(r *http.Request) (caller, bool) {
	if r == nil {
		return caller{}, false
	}
	c, ok := r.Context().Value(callerKey{}).(caller)
	return c, ok
}

// scopedCaller is r's caller with the rights it has in the scope r asks
// for: the operator scoped to a project (api.ProjectHeader) acts as that
// project's client certificate would, and does not create vTPMs.
func scopedCaller(r *http.Request) caller {
	c, _ := callerOf(r)
	if c.operator && r.Header.Get(api.ProjectHeader) != "" {
		c.rights &^= createsVTPMs
	}
	return c
}

// project is the caller's scope: a tenant's project, or the project the
// operator scoped itself to ("" for the operator unscoped). Agents' and
// public routes have no caller, so the header scopes nothing there.
func project(r *http.Request) (string, error) {
	c, ok := callerOf(r)
	if !ok {
		return "", nil
	}
	p := r.Header.Get(api.ProjectHeader)
	if p != "" && !tenant.Valid(p) {
		return "", refusal.Invalid(api.CodeInvalidProject, "The "+api.ProjectHeader+" header is not a valid project id.")
	}
	if !c.operator {
		if p != "" && p != c.project {
			return "", refusal.Forbidden(api.CodeInvalidProject, "The caller is scoped to project "+c.project+", not "+p+".")
		}
		return c.project, nil
	}
	return p, nil
}

// tenantOf is the request's caller as the domain packages take it: its
// scope (project) and its name in the event log (actor).
func tenantOf(r *http.Request) (tenant.Caller, error) {
	scope, err := project(r)
	if err != nil {
		return tenant.Caller{}, err
	}
	return tenant.Caller{Project: scope, Actor: actor(r, scope)}, nil
}

// actor names who made a change through the API, for the event log: the
// operator or a project, and the holder of the client certificate, the
// Keystone user or the local user that proved it. A request with no authenticated caller is an
// agent's, proven by its token or its TPM: it is named as the agent of
// the instance or host it speaks for, never as a project or the operator.
func actor(r *http.Request, scope string) string {
	c, ok := callerOf(r)
	if !ok {
		return "attestation agent"
	}
	who := "api:operator"
	if scope != "" {
		who = "api:project:" + scope
	}
	switch {
	case c.user != "":
		who += " (user " + strconv.QuoteToGraphic(refusal.Truncate(c.user)) + ")"
	case c.name != "":
		who += " (" + strconv.QuoteToGraphic(refusal.Truncate(c.name)) + ")"
	}
	return who
}

// bearerToken is the request's bearer token (Authorization: Bearer), an
// agent's or a host's; "" when it carries none.
func bearerToken(r *http.Request) string {
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return ""
	}
	return token
}
