package store

import (
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Backup is a state bundle a server holds for a vTPM.
type Backup struct {
	InstanceID  string
	Incarnation string
	Generation  int64
	// Reason is why it was taken: manual, periodic or stop.
	Reason     string
	SourceHost string
	CreatedAt  time.Time
	// Size is len(Bundle); ListBackups leaves Bundle nil.
	Size   int
	Bundle []byte
}

// The reasons for a backup.
const (
	BackupManual   = "manual"
	BackupPeriodic = "periodic"
	BackupStop     = "stop"
)

// HandOutGeneration returns the next bundle generation of the vTPM
// instanceID of incarnation: one more than any handed out before (a new
// incarnation starts again at 1).
func (t *Tx) HandOutGeneration(instanceID, incarnation string) (int64, error) {
	handed, _, err := t.generations(instanceID, incarnation)
	if err != nil {
		return 0, err
	}
	_, err = t.exec(`INSERT INTO bundle_generations (instance_id, incarnation, handed_out, newest) VALUES (?,?,?,0)
		ON CONFLICT (instance_id) DO UPDATE SET incarnation=excluded.incarnation, handed_out=excluded.handed_out,
		newest=CASE WHEN bundle_generations.incarnation=excluded.incarnation THEN bundle_generations.newest ELSE 0 END`,
		instanceID, incarnation, handed+1)
	return handed + 1, err
}

// NewestGeneration is the newest bundle generation a server received of
// the vTPM (RecordGeneration); 0 for none.
func (t *Tx) NewestGeneration(instanceID, incarnation string) (int64, error) {
	_, newest, err := t.generations(instanceID, incarnation)
	return newest, err
}

// RecordGeneration records that a server received the vTPM's bundle of
// generation gen: any older one is stale from now on.
func (t *Tx) RecordGeneration(instanceID, incarnation string, gen int64) error {
	_, err := t.exec(`UPDATE bundle_generations SET newest=? WHERE instance_id=? AND incarnation=? AND newest<?`,
		gen, instanceID, incarnation, gen)
	return err
}

func (t *Tx) generations(instanceID, incarnation string) (handed, newest int64, err error) {
	var inc string
	err = t.queryRow(`SELECT incarnation, handed_out, newest FROM bundle_generations WHERE instance_id=?`, instanceID).Scan(&inc, &handed, &newest)
	if errors.Is(err, sql.ErrNoRows) || err == nil && inc != incarnation {
		return 0, 0, nil
	}
	return handed, newest, err
}

// PutBackup stores b and removes the vTPM's oldest backups beyond keep
// (at least 1).
func (t *Tx) PutBackup(b *Backup, keep int) error {
	_, err := t.exec(`INSERT INTO state_backups (instance_id, incarnation, generation, reason, source_host, created_at, bundle) VALUES (?,?,?,?,?,?,?)`,
		b.InstanceID, b.Incarnation, b.Generation, b.Reason, b.SourceHost, stamp(b.CreatedAt), b.Bundle)
	if err != nil {
		return err
	}
	_, err = t.exec(`DELETE FROM state_backups WHERE instance_id=? AND generation NOT IN
		(SELECT generation FROM state_backups WHERE instance_id=? AND incarnation=? ORDER BY generation DESC LIMIT ?)`,
		b.InstanceID, b.InstanceID, b.Incarnation, max(keep, 1))
	return err
}

// ListBackups returns the backups of the vTPM, newest first, without
// their bundles.
func (t *Tx) ListBackups(instanceID, incarnation string) ([]Backup, error) {
	rows, err := t.query(`SELECT generation, reason, source_host, created_at, LENGTH(bundle) FROM state_backups
		WHERE instance_id=? AND incarnation=? ORDER BY generation DESC`, instanceID, incarnation)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Backup
	for rows.Next() {
		b := Backup{InstanceID: instanceID, Incarnation: incarnation}
		var at string
		if err := rows.Scan(&b.Generation, &b.Reason, &b.SourceHost, &at, &b.Size); err != nil {
			return nil, err
		}
		b.CreatedAt = parseStamp(at)
		out = append(out, b)
	}
	return out, rows.Err()
}

// GetBackup reads the vTPM's backup of generation gen (0: the newest),
// with its bundle; ErrNotFound if there is none.
func (t *Tx) GetBackup(instanceID, incarnation string, gen int64) (*Backup, error) {
	q := `SELECT generation, reason, source_host, created_at, bundle FROM state_backups WHERE instance_id=? AND incarnation=?`
	args := []any{instanceID, incarnation}
	if gen != 0 {
		q += ` AND generation=?`
		args = append(args, gen)
	}
	b := &Backup{InstanceID: instanceID, Incarnation: incarnation}
	var at string
	err := t.queryRow(q+` ORDER BY generation DESC LIMIT 1`, args...).Scan(&b.Generation, &b.Reason, &b.SourceHost, &at, &b.Bundle)
	if err != nil {
		return nil, fmt.Errorf("backup of vtpm %s: %w", instanceID, notFound(err))
	}
	b.CreatedAt, b.Size = parseStamp(at), len(b.Bundle)
	return b, nil
}

// LastBackups returns, for every vTPM with a backup of its incarnation,
// when its newest was taken.
func (t *Tx) LastBackups() (map[string]time.Time, error) {
	rows, err := t.query(`SELECT b.instance_id, MAX(b.created_at) FROM state_backups b
		JOIN vtpms v ON v.instance_id = b.instance_id AND v.incarnation = b.incarnation GROUP BY b.instance_id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]time.Time{}
	for rows.Next() {
		var id, at string
		if err := rows.Scan(&id, &at); err != nil {
			return nil, err
		}
		out[id] = parseStamp(at)
	}
	return out, rows.Err()
}

// deleteBundles removes what the store holds of instanceID's state
// bundles: its backups, shelved bundle, generations, transfers and
// migration.
func (t *Tx) deleteBundles(instanceID string) error {
	for _, table := range []string{"state_backups", "shelved_bundles", "bundle_generations", "state_transfers", "vtpm_migrations"} {
		if _, err := t.exec(`DELETE FROM `+table+` WHERE instance_id=?`, instanceID); err != nil {
			return err
		}
	}
	return nil
}

// Shelved is the state bundle a server holds for a vTPM that has no host
// (shelved, or evacuated from a host that is gone) until it is unshelved.
// Unlike backups, it is never rotated away.
type Shelved struct {
	InstanceID  string
	Incarnation string
	Generation  int64
	// Reason is how it left its host: shelve or evacuate.
	Reason    string
	FromHost  string
	CreatedAt time.Time
	Bundle    []byte
}

// The reasons for a shelved bundle.
const (
	ShelvedShelve   = "shelve"
	ShelvedEvacuate = "evacuate"
)

// PutShelved keeps s as its vTPM's shelved bundle, in place of any
// earlier one.
func (t *Tx) PutShelved(s *Shelved) error {
	_, err := t.exec(`INSERT INTO shelved_bundles (instance_id, incarnation, generation, reason, from_host, created_at, bundle) VALUES (?,?,?,?,?,?,?)
		ON CONFLICT (instance_id) DO UPDATE SET incarnation=excluded.incarnation, generation=excluded.generation, reason=excluded.reason,
		from_host=excluded.from_host, created_at=excluded.created_at, bundle=excluded.bundle`,
		s.InstanceID, s.Incarnation, s.Generation, s.Reason, s.FromHost, stamp(s.CreatedAt), s.Bundle)
	return err
}

// GetShelved reads the shelved bundle of the vTPM; ErrNotFound if it has
// none.
func (t *Tx) GetShelved(instanceID, incarnation string) (*Shelved, error) {
	s := &Shelved{InstanceID: instanceID, Incarnation: incarnation}
	var at string
	err := t.queryRow(`SELECT generation, reason, from_host, created_at, bundle FROM shelved_bundles WHERE instance_id=? AND incarnation=?`,
		instanceID, incarnation).Scan(&s.Generation, &s.Reason, &s.FromHost, &at, &s.Bundle)
	if err != nil {
		return nil, fmt.Errorf("shelved bundle of vtpm %s: %w", instanceID, notFound(err))
	}
	s.CreatedAt = parseStamp(at)
	return s, nil
}

// DeleteShelved removes the vTPM's shelved bundle: its import proved it
// opens on its new host.
func (t *Tx) DeleteShelved(instanceID, incarnation string) error {
	_, err := t.exec(`DELETE FROM shelved_bundles WHERE instance_id=? AND incarnation=?`, instanceID, incarnation)
	return err
}

// EvacuatedFrom lists the instance ids of the vTPMs evacuated from host
// whose bundles the servers still hold: those not yet unshelved
// elsewhere.
func (t *Tx) EvacuatedFrom(host string) ([]string, error) {
	rows, err := t.query(`SELECT instance_id FROM shelved_bundles WHERE from_host=? AND reason=? ORDER BY instance_id`, host, ShelvedEvacuate)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		out = append(out, id)
	}
	return out, rows.Err()
}
