package store

import (
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"
)

// The web console's sign-in links and sessions are rows, each found by the
// SHA-256 of its secret (the link's code, the cookie): any server replica
// sharing the store checks any of them, and deleting one ends it on every
// replica at once. The store never holds a secret itself.

// SessionKind is what a ConsoleSession's secret is.
type SessionKind string

const (
	// SessionLink: a sign-in link, not yet used; used once.
	SessionLink SessionKind = "link"
	// SessionSigned: a browser signed in with a link, as the session says.
	SessionSigned SessionKind = "session"
	// SessionKeystone: a browser signed in with Keystone; its cookie is
	// the Keystone token, which names the viewer on each request.
	SessionKeystone SessionKind = "keystone"
)

// ConsoleSession is a sign-in link or a signed-in browser of the web
// console.
type ConsoleSession struct {
	TokenHash []byte // SHA-256 of the link's code or the cookie's value
	Kind      SessionKind
	// Name and Project say who signs in: a name, and the one project
	// seen ("" for the operator).
	Name, Project        string
	CreatedAt, ExpiresAt time.Time
}

// CreateConsoleSession stores s, good for ttl from now, and forgets the
// expired ones.
func (t *Tx) CreateConsoleSession(s *ConsoleSession, ttl time.Duration) error {
	if _, err := t.exec(`DELETE FROM console_sessions WHERE expires_at <= ?`, sortable(t.now)); err != nil {
		return err
	}
	s.CreatedAt, s.ExpiresAt = t.now, t.now.Add(ttl)
	_, err := t.exec(`INSERT INTO console_sessions (token_hash, kind, name, project, expires_at, created_at) VALUES (?,?,?,?,?,?)`,
		hex.EncodeToString(s.TokenHash), string(s.Kind), s.Name, s.Project, sortable(s.ExpiresAt), sortable(s.CreatedAt))
	return err
}

// GetConsoleSession reads the unexpired link or session whose secret
// hashes to hash; ErrNotFound if there is none (never made, ended, or
// expired).
func (t *Tx) GetConsoleSession(hash []byte) (*ConsoleSession, error) {
	s := &ConsoleSession{TokenHash: hash}
	var created, expires string
	err := t.queryRow(`SELECT kind, name, project, created_at, expires_at FROM console_sessions WHERE token_hash=? AND expires_at > ?`,
		hex.EncodeToString(hash), sortable(t.now)).Scan(&s.Kind, &s.Name, &s.Project, &created, &expires)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("console session: %w", ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	s.CreatedAt, _ = time.Parse(sortableLayout, created)
	s.ExpiresAt, _ = time.Parse(sortableLayout, expires)
	return s, nil
}

// TakeConsoleSession reads and ends the unexpired link or session of kind
// whose secret hashes to hash: a link is used once. ErrNotFound if there
// is none of that kind, or another transaction took it first.
func (t *Tx) TakeConsoleSession(hash []byte, kind SessionKind) (*ConsoleSession, error) {
	s, err := t.GetConsoleSession(hash)
	if err == nil && s.Kind != kind {
		err = fmt.Errorf("console %s: %w", kind, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	if err := t.EndConsoleSession(hash); err != nil {
		return nil, err
	}
	return s, nil
}

// EndConsoleSession ends the link or session whose secret hashes to hash;
// ErrNotFound if there is none.
func (t *Tx) EndConsoleSession(hash []byte) error {
	res, err := t.exec(`DELETE FROM console_sessions WHERE token_hash=?`, hex.EncodeToString(hash))
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("console session: %w", ErrNotFound)
	}
	return nil
}

// EndConsoleSessions ends the links and sessions (expired ones too) of
// the given projects ("" is the operator's), all of them when none is
// given, and says how many it ended that had not expired.
func (t *Tx) EndConsoleSessions(projects ...string) (int, error) {
	filter, args := "", []any{}
	if len(projects) > 0 {
		filter = ` AND project IN (?` + strings.Repeat(",?", len(projects)-1) + `)`
		for _, p := range projects {
			args = append(args, p)
		}
	}
	var live int
	err := t.queryRow(`SELECT COUNT(*) FROM console_sessions WHERE expires_at > ?`+filter, append([]any{sortable(t.now)}, args...)...).Scan(&live)
	if err != nil {
		return 0, err
	}
	_, err = t.exec(`DELETE FROM console_sessions WHERE 1=1`+filter, args...)
	return live, err
}
