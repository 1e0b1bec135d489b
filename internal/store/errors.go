package store

import "errors"

var (
	// ErrNotFound: no record with that key.
	ErrNotFound = errors.New("not found")
	// ErrExists: a record with that key exists already.
	ErrExists = errors.New("already exists")
	// ErrConflict: the record changed since it was read (generation mismatch).
	ErrConflict = errors.New("changed concurrently")
)
