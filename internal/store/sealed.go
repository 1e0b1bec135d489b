package store

import (
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Kinds of sealed keys.
const (
	// SealedSecret is a secret of the embedded key manager, named by its
	// UUID.
	SealedSecret = "secret"
	// SealedDeployment is one of the deployment's own keys (a CA's, the
	// verdict signing key, …), named by its role.
	SealedDeployment = "deployment"
	// SealedStaged is a vTPM secret staged for its host's agent, named by
	// its UUID, until its expiry (StageExpiry).
	SealedStaged = "staged"
)

// SealedKey is a key sealed under the deployment's master key. The store
// never sees it in the clear; internal/keyring seals and opens it.
type SealedKey struct {
	Kind      string // SealedSecret, SealedDeployment or SealedStaged
	Name      string
	MasterKey string // the id of the master key that sealed Blob
	Blob      []byte
}

// MasterKeyID is the id of the master key every sealed key is sealed
// under; "" before the first is sealed.
func (t *Tx) MasterKeyID() (string, error) {
	var id string
	err := t.queryRow(`SELECT id FROM master_key`).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	return id, err
}

// SetMasterKeyID records id as the master key every sealed key is sealed
// under.
func (t *Tx) SetMasterKeyID(id string) error {
	res, err := t.exec(`UPDATE master_key SET id=?`, id)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		_, err = t.exec(`INSERT INTO master_key (id) VALUES (?)`, id)
	}
	return err
}

// PutSealedKey stores k; ErrExists if its kind holds its name already.
func (t *Tx) PutSealedKey(k SealedKey) error {
	res, err := t.exec(`INSERT INTO sealed_keys (kind, name, master_key, blob) VALUES (?,?,?,?) ON CONFLICT DO NOTHING`,
		k.Kind, k.Name, k.MasterKey, k.Blob)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("sealed key %s %s: %w", k.Kind, k.Name, ErrExists)
	}
	return nil
}

// PutSealedKeyIfCurrent stores k if the store names k.MasterKey as the
// master key (and holds no key of its kind and name): stored says whether
// it did; if not, PutSealedKey tells why.
func (t *Tx) PutSealedKeyIfCurrent(k SealedKey) (stored bool, err error) {
	return changedRow(t.exec(`INSERT INTO sealed_keys (kind, name, master_key, blob)
		SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM master_key WHERE id=?) ON CONFLICT DO NOTHING`,
		k.Kind, k.Name, k.MasterKey, k.Blob, k.MasterKey))
}

// ResealKey replaces the blob of an existing sealed key (a master key
// rotation); ErrNotFound if there is none.
func (t *Tx) ResealKey(k SealedKey) error {
	res, err := t.exec(`UPDATE sealed_keys SET master_key=?, blob=? WHERE kind=? AND name=?`, k.MasterKey, k.Blob, k.Kind, k.Name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("sealed key %s %s: %w", k.Kind, k.Name, ErrNotFound)
	}
	return nil
}

// SealedKey reads a sealed key; ErrNotFound if there is none.
func (t *Tx) SealedKey(kind, name string) (SealedKey, error) {
	k := SealedKey{Kind: kind, Name: name}
	err := t.queryRow(`SELECT master_key, blob FROM sealed_keys WHERE kind=? AND name=?`, kind, name).Scan(&k.MasterKey, &k.Blob)
	if errors.Is(err, sql.ErrNoRows) {
		return k, fmt.Errorf("sealed key %s %s: %w", kind, name, ErrNotFound)
	}
	return k, err
}

// DeleteSealedKey deletes a sealed key; ErrNotFound if there is none.
func (t *Tx) DeleteSealedKey(kind, name string) error {
	res, err := t.exec(`DELETE FROM sealed_keys WHERE kind=? AND name=?`, kind, name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("sealed key %s %s: %w", kind, name, ErrNotFound)
	}
	return nil
}

// SealedKeyNames lists the names of the sealed keys of kind, sorted.
func (t *Tx) SealedKeyNames(kind string) ([]string, error) {
	rows, err := t.query(`SELECT name FROM sealed_keys WHERE kind=? ORDER BY name`, kind)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	names := []string{}
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return nil, err
		}
		names = append(names, name)
	}
	return names, rows.Err()
}

// SealedKeys reads every sealed key of every kind, for a master key
// rotation.
func (t *Tx) SealedKeys() ([]SealedKey, error) {
	rows, err := t.query(`SELECT kind, name, master_key, blob FROM sealed_keys ORDER BY kind, name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var keys []SealedKey
	for rows.Next() {
		var k SealedKey
		if err := rows.Scan(&k.Kind, &k.Name, &k.MasterKey, &k.Blob); err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	return keys, rows.Err()
}

// SetStagedExpiry records when the staged secret name (a sealed key of
// kind SealedStaged) stops being given out.
func (t *Tx) SetStagedExpiry(name string, until time.Time) error {
	_, err := t.exec(`INSERT INTO staged_secrets (name, expires_at) VALUES (?,?)
		ON CONFLICT (name) DO UPDATE SET expires_at=excluded.expires_at`, name, sortable(until))
	return err
}

// StagedExpiry is when the staged secret name stops being given out;
// ErrNotFound if none is staged.
func (t *Tx) StagedExpiry(name string) (time.Time, error) {
	var s string
	if err := t.queryRow(`SELECT expires_at FROM staged_secrets WHERE name=?`, name).Scan(&s); err != nil {
		return time.Time{}, fmt.Errorf("staged secret %s: %w", name, notFound(err))
	}
	return time.Parse(sortableLayout, s)
}

// DropStaged deletes the staged secret name, if there is one.
func (t *Tx) DropStaged(name string) error {
	if _, err := t.exec(`DELETE FROM staged_secrets WHERE name=?`, name); err != nil {
		return err
	}
	_, err := t.exec(`DELETE FROM sealed_keys WHERE kind=? AND name=?`, SealedStaged, name)
	return err
}

// DropExpiredStaged deletes the staged secrets expired at now, and
// returns how many.
func (t *Tx) DropExpiredStaged(now time.Time) (int, error) {
	rows, err := t.query(`SELECT name FROM staged_secrets WHERE expires_at<=?`, sortable(now))
	if err != nil {
		return 0, err
	}
	var names []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return 0, err
		}
		names = append(names, n)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return 0, err
	}
	for _, n := range names {
		if err := t.DropStaged(n); err != nil {
			return 0, err
		}
	}
	return len(names), nil
}
