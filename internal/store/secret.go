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
	err := t.queryRow(`SELECT host FROM host_credentials WHERE token_hash=?`, tokenHash).Scan(&host)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("host credential: %w", ErrNotFound)
	}
	return host, err
}

// AddSecret records that secret id, of project, was stored by a tenant
// through the API.
func (t *Tx) AddSecret(id, project string) error {
	_, err := t.exec(`INSERT INTO secrets (id, project, created_at) VALUES (?,?,?)`, id, project, stamp(t.now))
	return err
}

// SecretProject is the project of a tenant's secret; ErrNotFound if id is
// not one (a vTPM's own secret, or none at all).
func (t *Tx) SecretProject(id string) (string, error) {
	var project string
	err := t.queryRow(`SELECT project FROM secrets WHERE id=?`, id).Scan(&project)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("secret %s: %w", id, ErrNotFound)
	}
	return project, err
}

// Secrets lists the ids of tenants' secrets.
func (t *Tx) Secrets() ([]string, error) {
	rows, err := t.query(`SELECT id FROM secrets ORDER BY id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}
