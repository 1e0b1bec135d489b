package agent

import "errors"

var (
	// ErrNotFound: Records has no such vTPM (it was deleted, or replaced
	// by a new vTPM of the instance id), or no such host.
	ErrNotFound = errors.New("no such record")
	// ErrConflict: the record changed since it was read.
	ErrConflict = errors.New("vTPM record changed since it was read")
	// ErrNeedsOwner: the vTPM's secret is its owner's (secret security
	// user or host, with Barbican): the host gets it only when its
	// owner's request (create, start) stages it, and none is staged now.
	ErrNeedsOwner = errors.New("the vTPM's secret needs its owner's request")
)
