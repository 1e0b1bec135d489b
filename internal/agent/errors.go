package agent

import "errors"

var (
	// ErrNotFound: Records has no such vTPM (it was deleted, or replaced
	// by a new vTPM of the instance id), or no such host.
	ErrNotFound = errors.New("no such record")
	// ErrConflict: the record changed since it was read.
	ErrConflict = errors.New("vTPM record changed since it was read")
)
