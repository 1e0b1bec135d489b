package store

import "errors"

var (
	// ErrNotFound: no record with that key.
	ErrNotFound = errors.New("not found")
	// ErrExists: a record with that key exists already.
	ErrExists = errors.New("already exists")
	// ErrConflict: the record changed since it was read (generation mismatch).
	ErrConflict = errors.New("changed concurrently")
	// ErrFull: the database's disk is full (SQLite's SQLITE_FULL,
	// PostgreSQL's 53100 disk_full, or ENOSPC); nothing was written. Every
	// error of Update and View that says so wraps it.
	ErrFull = errors.New("the store's disk is full")
	// ErrSchemaNewer: the database's schema is newer than this build of
	// vtpmd knows (a newer vtpmd migrated it); the store refuses to open.
	ErrSchemaNewer = errors.New("the database schema is newer than this vtpmd")
	// ErrSchemaOlder: the database's schema lacks migrations this build
	// applies when it opens a store (SchemaCurrent).
	ErrSchemaOlder = errors.New("the database schema is older than this vtpmd")
)
