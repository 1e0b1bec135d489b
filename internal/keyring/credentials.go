package keyring

import "context"

// A key manager that enforces its own access control (Barbican) acts for
// whoever asks: a vTPM whose secret security is "user" or "host" keeps its
// secret under its owner's identity, so the API hands the caller's
// validated token down to the keyring with the request's context. Embedded
// providers ignore it.

type tokenKey struct{}

// WithToken returns ctx carrying the caller's validated identity token
// (a Keystone token), for a key manager that acts as the caller.
func WithToken(ctx context.Context, token string) context.Context {
	return context.WithValue(ctx, tokenKey{}, token)
}

// Token is the caller's token that WithToken put in ctx, if any.
func Token(ctx context.Context) (string, bool) {
	t, ok := ctx.Value(tokenKey{}).(string)
	return t, ok && t != ""
}

// AsService returns ctx without the caller's token: a key manager that
// acts as the caller acts as vtpmd's own service identity instead, for a
// secret the deployment holds (secret security "deployment", tenants'
// secrets stored through vtpmd).
func AsService(ctx context.Context) context.Context {
	return context.WithValue(ctx, tokenKey{}, "")
}

// CallerScoped is a key manager that keeps a secret under the identity
// that stored it (Barbican, which scopes every secret to the storing
// token's project): a secret stored with a caller's token can be read
// again only with a token of that project, never with vtpmd's own. A vTPM
// whose secret security is "user" or "host" cannot then be started by
// vtpmd alone; its owner's requests stage the secret for the host.
type CallerScoped interface {
	Keyring
	// ScopedToCaller reports that secrets stored with a caller's token
	// are that caller's project's.
	ScopedToCaller() bool
}

// ServiceHolder is a caller-scoped key manager that tells a secret vtpmd's
// own service identity holds (in the service's project, where Nova's
// deployment mode keeps vTPM secrets) from one it can merely read (another
// project's, through a grant such as a Barbican ACL).
type ServiceHolder interface {
	CallerScoped
	// ServiceHolds reports whether secret id is in the service's project.
	ServiceHolds(ctx context.Context, id string) (bool, error)
}
