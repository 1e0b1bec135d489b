// Package tenant is project scoping: who asks (a project, or the operator
// acting for every project) and which project a new resource belongs to.
// The API server authenticates callers; the domain packages take a Caller
// and apply these rules.
package tenant

import (
	"regexp"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
)

// Caller is who asks, as the API authenticated it.
type Caller struct {
	// Project is the one project the caller acts in: a tenant's, or the
	// one the operator scoped itself to. "" is the operator acting for
	// every project, and an agent, whose requests its token or its TPM
	// proves rather than a caller's identity.
	Project string
	// Actor names the caller in the event log.
	Actor string
}

// Sees reports whether c may see what project owns. Another project's
// objects read as absent ones do.
func (c Caller) Sees(project string) bool { return c.Project == "" || c.Project == project }

// Owner is the project a new resource (what: "vTPMs", "secrets") belongs
// to: the one requested, else the caller's. When required, a caller acting
// for every project must name one.
func (c Caller) Owner(requested, what string, required bool) (string, error) {
	switch {
	case requested == "" && c.Project == "" && required:
		return "", refusal.Invalid(api.CodeInvalidProject, "A project is required: set \"project\" or the "+api.ProjectHeader+" header.")
	case requested == "":
		return c.Project, nil
	case c.Project != "" && requested != c.Project:
		return "", refusal.Forbidden(api.CodeInvalidProject, "A caller scoped to one project cannot create "+what+" for another.")
	case !Valid(requested):
		return "", refusal.Invalid(api.CodeInvalidProject, "Project "+refusal.Quote(requested)+" is not a valid project id.")
	}
	return requested, nil
}

var projectRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// Valid reports whether project is a project id: a letter or digit, then
// up to 63 letters, digits, '_', '.' and '-'. (No colons: the operator's
// client certificates name "system:operator", never a project.)
func Valid(project string) bool { return projectRE.MatchString(project) }
