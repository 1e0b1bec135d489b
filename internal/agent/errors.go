package agent

import "errors"

var (
	// ErrNotFound: Records has no such vTPM (it was deleted, or replaced
	// by a new vTPM of the instance id).
	ErrNotFound = errors.New("no such vTPM record")
	// ErrConflict: the record changed since it was read.
	ErrConflict = errors.New("vTPM record changed since it was read")
)
