package spec

import "github.com/vtpmd/vtpmd/api"

// Error is a refused request. Match it with errors.As and compare Code,
// one of the request-semantics codes of package api (api.CodeNoValidHost,
// …); Message is for people and names the flavor, image and values
// involved.
type Error struct {
	Code    api.Code
	Message string
	// Traits, for api.CodeNoValidHost, are the required traits that no
	// host offers (or the closest host lacks); nil when capacity or the
	// hosts' state (down, draining) was the problem.
	Traits []string
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Message }
