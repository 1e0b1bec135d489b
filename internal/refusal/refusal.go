// Package refusal is the one error type vtpmd's domain packages return for
// a request the caller must change: what kind of refusal it is, its stable
// code (api.Code) and a message for people. Anything else a domain
// package returns is a fault of the server.
//
// The kind says nothing of HTTP; the API server answers each kind with one
// status (internal/server, toAPIError), so a rule that refuses can live
// wherever it belongs and be called from anywhere.
package refusal

import (
	"strconv"

	"github.com/vtpmd/vtpmd/api"
)

// Kind is what a refusal says of the request.
type Kind int

const (
	// KindInvalid: the request breaks a rule of its own (a malformed id, a
	// missing field); the same request will always be refused.
	KindInvalid Kind = iota + 1
	// KindUnauthenticated: the caller did not prove who it is (a token, a
	// credential).
	KindUnauthenticated
	// KindForbidden: the caller is known, or its TPM is, and may not do
	// this.
	KindForbidden
	// KindNotFound: what the request names does not exist, or is another
	// project's, which reads the same.
	KindNotFound
	// KindConflict: the state of what the request names does not allow it
	// now; it may succeed later or after another request.
	KindConflict
	// KindUnavailable: something the request needs (a host's agent) did
	// not answer; the same request may succeed later.
	KindUnavailable
)

// Error is a refusal. Match it with errors.As and compare Code.
type Error struct {
	Kind    Kind
	Code    api.Code
	Message string
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Message }

// Invalid refuses a request that breaks a rule of its own.
func Invalid(code api.Code, msg string) *Error { return &Error{KindInvalid, code, msg} }

// Unauthenticated refuses a caller that proved nobody.
func Unauthenticated(code api.Code, msg string) *Error {
	return &Error{KindUnauthenticated, code, msg}
}

// Forbidden refuses a caller that may not do this.
func Forbidden(code api.Code, msg string) *Error { return &Error{KindForbidden, code, msg} }

// NotFound refuses a request for something that is not there.
func NotFound(code api.Code, msg string) *Error { return &Error{KindNotFound, code, msg} }

// Conflict refuses a request the current state does not allow.
func Conflict(code api.Code, msg string) *Error { return &Error{KindConflict, code, msg} }

// Unavailable refuses a request whose answer depends on something that did
// not answer.
func Unavailable(code api.Code, msg string) *Error { return &Error{KindUnavailable, code, msg} }

// Truncate cuts what a caller sent to at most 64 bytes, for a message or
// the log.
func Truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

// Quote is what a caller sent, truncated and quoted, for a message.
func Quote(s string) string { return strconv.Quote(Truncate(s)) }
