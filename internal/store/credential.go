package store

import (
	"database/sql"
	"errors"
	"fmt"
)

// PutHostCredential sets host's credential (SHA-256 of its bearer token),
// replacing the one it had.
func (t *Tx) PutHostCredential(host string, tokenHash []byte) error {
	_, err := t.exec(`INSERT INTO host_credentials (host, token_hash, created_at) VALUES (?,?,?)
		ON CONFLICT(host) DO UPDATE SET token_hash=excluded.token_hash, created_at=excluded.created_at`,
		host, tokenHash, stamp(t.now))
	return err
}

// HostByCredential is the host whose credential hashes to tokenHash;
// ErrNotFound if none.
func (t *Tx) HostByCredential(tokenHash []byte) (string, error) {
	var host string
	err := t.tx.QueryRowContext(t.ctx, `SELECT host FROM host_credentials WHERE token_hash=?`, tokenHash).Scan(&host)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("host credential: %w", ErrNotFound)
	}
	return host, err
}
