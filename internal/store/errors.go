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
)
