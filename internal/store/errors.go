package store

import (
	"errors"
	"fmt"
)

var (
	// ErrNotFound: no record with that key.
	ErrNotFound = errors.New("not found")
	// ErrExists: a record with that key exists already.
	ErrExists = errors.New("already exists")
	// ErrConflict: the record changed since it was read (generation mismatch).
	ErrConflict = errors.New("changed concurrently")
	// ErrContended: on PostgreSQL, other transactions touching the same
	// rows kept winning until the retries ran out; nothing was written. It
	// is an ErrConflict too: the same call may succeed when retried.
	ErrContended = fmt.Errorf("%w: other writers kept winning", ErrConflict)
	// ErrFull: the database's disk is full (SQLite's SQLITE_FULL,
	// PostgreSQL's 53100 disk_full, or ENOSPC); nothing was written. Every
	// error of Update and View that says so wraps it.
	ErrFull = errors.New("the store's disk is full")
	// ErrUnavailable: the database could not be reached, or not in time:
	// PostgreSQL refused or dropped the connection, is shutting down or
	// starting, has no connection slot left, or no connection came free
	// within connWait; SQLite stayed locked past its busy timeout. The
	// same call may succeed once the database is back. Every error of
	// Update and View that says so is an *UnavailableError.
	ErrUnavailable = errors.New("the store's database is unavailable")
	// ErrSchemaNewer: the database's schema is newer than this build of
	// vtpmd knows (a newer vtpmd migrated it); the store refuses to open.
	ErrSchemaNewer = errors.New("the database schema is newer than this vtpmd")
	// ErrSchemaOlder: the database's schema lacks migrations this build
	// applies when it opens a store (SchemaCurrent).
	ErrSchemaOlder = errors.New("the database schema is older than this vtpmd")
)

// UnavailableError is an ErrUnavailable. A transaction it ends did not
// commit, unless the connection was lost while committing: then
// MaybeCommitted says that it may have.
type UnavailableError struct {
	Err        error
	Committing bool // the connection was lost during COMMIT
}

func (e *UnavailableError) Error() string {
	if e.Committing {
		return "the store's database became unavailable while committing (the transaction may have committed): " + e.Err.Error()
	}
	return "the store's database is unavailable: " + e.Err.Error()
}

func (e *UnavailableError) Unwrap() error { return e.Err }

// Is makes errors.Is(err, ErrUnavailable) hold.
func (e *UnavailableError) Is(target error) bool { return target == ErrUnavailable }

// MaybeCommitted reports whether the transaction may have committed all
// the same: what it wrote must not be undone elsewhere (a secret its
// record names shredded), though it may not be there either.
func (e *UnavailableError) MaybeCommitted() bool { return e.Committing }
