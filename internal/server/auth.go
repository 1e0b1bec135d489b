package server

import (
	"context"
	"net/http"
)

// access says who may call a route when callers are authenticated.
type access int

const (
	// callers are tenants and the operator, known by client certificate.
	callers access = iota
	// agents are guest and host agents: the handler checks their bearer
	// token or host credential, or the route needs none (a registration
	// is proven by the TPM itself).
	agents
	// anyone may read public documents: health, OpenAPI, CA, verdict keys.
	anyone
)

// OperatorOrganization in a client certificate's subject makes its holder
// the operator. It cannot be a project id (no colons in those).
const OperatorOrganization = "system:operator"

// caller is who an authenticated request comes from.
type caller struct {
	name     string // the certificate's common name, for the event log
	project  string // the project a tenant acts in; "" for the operator
	operator bool
}

type callerKey struct{}

// authenticate names the caller from the client certificate that the TLS
// server verified against the deployment's client CAs: its subject's
// organization is the tenant's project, or OperatorOrganization.
func (s *Server) authenticate(r *http.Request) (*http.Request, error) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
		return r, apiErr(http.StatusUnauthorized, CodeUnauthenticated, "This API needs a client certificate (vtpmctl --cert and --key).")
	}
	leaf := r.TLS.VerifiedChains[0][0]
	c := caller{name: leaf.Subject.CommonName}
	switch org := leaf.Subject.Organization; {
	case len(org) == 1 && org[0] == OperatorOrganization:
		c.operator = true
	case len(org) == 1 && projectRE.MatchString(org[0]):
		c.project = org[0]
	default:
		return r, apiErr(http.StatusForbidden, CodeForbidden, "The client certificate names no project: its subject needs one organization, the project id (or "+OperatorOrganization+").")
	}
	return r.WithContext(context.WithValue(r.Context(), callerKey{}, c)), nil
}

// callerOf is the authenticated caller of r (may be nil), if any.
func callerOf(r *http.Request) (caller, bool) {
	if r == nil {
		return caller{}, false
	}
	c, ok := r.Context().Value(callerKey{}).(caller)
	return c, ok
}
