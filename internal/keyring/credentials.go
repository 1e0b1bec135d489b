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
