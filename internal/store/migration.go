package store

import (
	"fmt"
	"time"
)

// Migration is a migration of a vTPM from host Source to Target, cold or
// (Live) with its guest running, at Step: each step is recorded before the
// next begins, so that whoever runs the move again (after any crash)
// continues from it.
type Migration struct {
	InstanceID  string
	Incarnation string
	Source      string
	Target      string
	Live        bool
	Step        MigrationStep
	// WasRunning says the vTPM was wanted running when the move began: it
	// is wanted running again on Target once moved.
	WasRunning bool
	// Generation and Bundle are the bundle exported (step importing and
	// on); 0 and empty before. Of a live migration, Bundle is what
	// Target's agent prepared (step sending and on).
	Generation int64
	Bundle     []byte
	Actor      string
	StartedAt  time.Time
	UpdatedAt  time.Time
}

// MigrationStep is where a migration is.
type MigrationStep string

// The steps of a cold migration, in order. The record names Source until
// the step after MigrationImporting, Target from MigrationCleaning on.
const (
	// MigrationStopping: the vTPM is asked to stop on Source.
	MigrationStopping MigrationStep = "stopping"
	// MigrationExporting: Source's agent exports the bundle.
	MigrationExporting MigrationStep = "exporting"
	// MigrationImporting: Target's agent imports Bundle and proves it is
	// the vTPM's TPM; the record then switches to Target.
	MigrationImporting MigrationStep = "importing"
	// MigrationCleaning: the record names Target; Source's agent removes
	// its copy (and, of a live migration, Target's agent drops what only
	// the move needed).
	MigrationCleaning MigrationStep = "cleaning"
)

// The steps of a live migration, in order, then MigrationCleaning. The
// record names Source until the guest runs on Target.
const (
	// MigrationPreparing: Target's agent makes ready to receive the
	// guest (the libvirt secret, or vtpmd's swtpm waiting for the state).
	MigrationPreparing MigrationStep = "preparing"
	// MigrationSending: Source's agent has libvirt migrate the running
	// guest, its TPM state in the migration stream, to Target.
	MigrationSending MigrationStep = "sending"
)

// StartMigration records m, at its step; ErrExists if the vTPM has a
// migration already.
func (t *Tx) StartMigration(m *Migration) error {
	if _, err := t.GetMigration(m.InstanceID); err == nil {
		return fmt.Errorf("migration of %s: %w", m.InstanceID, ErrExists)
	}
	m.StartedAt, m.UpdatedAt = t.now, t.now
	if m.Bundle == nil {
		m.Bundle = []byte{}
	}
	_, err := t.exec(`INSERT INTO vtpm_migrations (instance_id, incarnation, source, target, live, step, was_running, generation, bundle, actor, started_at, updated_at)
		VALUES (?,?,?,?,?,?,?,?,?,?,?,?)`, m.InstanceID, m.Incarnation, m.Source, m.Target, boolInt(m.Live), m.Step, boolInt(m.WasRunning), m.Generation, m.Bundle,
		m.Actor, stamp(t.now), stamp(t.now))
	return err
}

// GetMigration reads the migration of the vTPM instanceID; ErrNotFound
// if it is not being moved.
func (t *Tx) GetMigration(instanceID string) (*Migration, error) {
	m := &Migration{}
	var live, running int
	var started, updated string
	err := t.queryRow(`SELECT instance_id, incarnation, source, target, live, step, was_running, generation, bundle, actor, started_at, updated_at
		FROM vtpm_migrations WHERE instance_id=?`, instanceID).
		Scan(&m.InstanceID, &m.Incarnation, &m.Source, &m.Target, &live, &m.Step, &running, &m.Generation, &m.Bundle, &m.Actor, &started, &updated)
	if err != nil {
		return nil, fmt.Errorf("migration of %s: %w", instanceID, notFound(err))
	}
	m.Live, m.WasRunning, m.StartedAt, m.UpdatedAt = live != 0, running != 0, parseStamp(started), parseStamp(updated)
	return m, nil
}

// AdvanceMigration records that m moved on from step from to m's Step
// (with its Generation and Bundle); ErrConflict if it is no longer at
// from (another server moved it on meanwhile).
func (t *Tx) AdvanceMigration(m *Migration, from MigrationStep) error {
	if m.Bundle == nil {
		m.Bundle = []byte{}
	}
	ok, err := changedRow(t.exec(`UPDATE vtpm_migrations SET step=?, generation=?, bundle=?, updated_at=? WHERE instance_id=? AND step=?`,
		m.Step, m.Generation, m.Bundle, stamp(t.now), m.InstanceID, from))
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("migration of %s at step %s: %w", m.InstanceID, from, ErrConflict)
	}
	m.UpdatedAt = t.now
	return nil
}

// FinishMigration removes the migration of the vTPM instanceID.
func (t *Tx) FinishMigration(instanceID string) error {
	_, err := t.exec(`DELETE FROM vtpm_migrations WHERE instance_id=?`, instanceID)
	return err
}

// ListMigrations lists the migrations from or to host, without their
// bundles (GetMigration reads one whole), oldest first.
func (t *Tx) ListMigrations(host string) ([]Migration, error) {
	rows, err := t.query(`SELECT instance_id, incarnation, source, target, step, was_running, generation, actor, started_at, updated_at
		FROM vtpm_migrations WHERE source=? OR target=? ORDER BY started_at, instance_id`, host, host)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Migration
	for rows.Next() {
		var m Migration
		var running int
		var started, updated string
		if err := rows.Scan(&m.InstanceID, &m.Incarnation, &m.Source, &m.Target, &m.Step, &running, &m.Generation, &m.Actor, &started, &updated); err != nil {
			return nil, err
		}
		m.WasRunning, m.StartedAt, m.UpdatedAt = running != 0, parseStamp(started), parseStamp(updated)
		out = append(out, m)
	}
	return out, rows.Err()
}
