package store

import (
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// The key broker's records (internal/broker): a project's secrets that
// vtpmd releases to attested instances, and each release, until revoked.

// BrokerSecret is a tenant's secret the broker releases, and to whom. Its
// payload is in the key manager under KeyID, never here.
type BrokerSecret struct {
	Project string
	Name    string
	KeyID   string
	// ReleaseTo lists the instances it may go to; empty: any instance of
	// the project judged by Policy.
	ReleaseTo []string
	// Policy names the policy an instance must be judged by; "" for any.
	// PolicyID is its identity (Policy.ID) when the secret was made: a
	// policy made again under the name is another.
	Policy, PolicyID string
	// MaxEvidenceAge bounds how old the instance's (and its host's) last
	// genuine evidence may be at a release.
	MaxEvidenceAge time.Duration
	CreatedAt      time.Time
}

// Release is one secret's release to one instance's vTPM: the last one,
// and how many there were, until it is revoked.
type Release struct {
	Project, Name string
	InstanceID    string
	Incarnation   string
	ReleasedAt    time.Time
	Releases      int64
	RevokedAt     time.Time // zero while it holds
	Reason        string    // why it was revoked
}

// CreateBrokerSecret stores s; ErrExists if its project has one of that
// name.
func (t *Tx) CreateBrokerSecret(s *BrokerSecret) error {
	to, err := json.Marshal(s.ReleaseTo)
	if err != nil {
		return err
	}
	res, err := t.exec(`INSERT INTO broker_secrets (project, name, key_id, release_to, policy, policy_id, max_evidence_age, created_at)
		VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING`,
		s.Project, s.Name, s.KeyID, string(to), s.Policy, s.PolicyID, s.MaxEvidenceAge.Milliseconds(), stamp(t.now))
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("secret %s: %w", s.Name, ErrExists)
	}
	s.CreatedAt = t.now
	return nil
}

const brokerSecretColumns = `project, name, key_id, release_to, policy, policy_id, max_evidence_age, created_at`

func scanBrokerSecret(row interface{ Scan(...any) error }) (*BrokerSecret, error) {
	var s BrokerSecret
	var to, at string
	var age int64
	if err := row.Scan(&s.Project, &s.Name, &s.KeyID, &to, &s.Policy, &s.PolicyID, &age, &at); err != nil {
		return nil, err
	}
	s.MaxEvidenceAge, s.CreatedAt = time.Duration(age)*time.Millisecond, parseStamp(at)
	return &s, json.Unmarshal([]byte(to), &s.ReleaseTo)
}

// GetBrokerSecret reads a project's secret; ErrNotFound if there is none.
func (t *Tx) GetBrokerSecret(project, name string) (*BrokerSecret, error) {
	s, err := scanBrokerSecret(t.queryRow(`SELECT `+brokerSecretColumns+` FROM broker_secrets WHERE project=? AND name=?`, project, name))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("secret %s: %w", name, ErrNotFound)
	}
	return s, err
}

// ListBrokerSecrets lists a project's secrets by name; every project's
// (by project, then name) when project is "".
func (t *Tx) ListBrokerSecrets(project string) ([]*BrokerSecret, error) {
	q, args := `SELECT `+brokerSecretColumns+` FROM broker_secrets`, []any{}
	if project != "" {
		q, args = q+` WHERE project=?`, append(args, project)
	}
	rows, err := t.query(q+` ORDER BY project, name`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*BrokerSecret
	for rows.Next() {
		s, err := scanBrokerSecret(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, rows.Err()
}

// DeleteBrokerSecret removes a project's secret and its releases;
// ErrNotFound if there is none. It returns the record, whose key the
// caller shreds once this commits.
func (t *Tx) DeleteBrokerSecret(project, name string) (*BrokerSecret, error) {
	s, err := t.GetBrokerSecret(project, name)
	if err != nil {
		return nil, err
	}
	if _, err := t.exec(`DELETE FROM secret_releases WHERE project=? AND name=?`, project, name); err != nil {
		return nil, err
	}
	_, err = t.exec(`DELETE FROM broker_secrets WHERE project=? AND name=?`, project, name)
	return s, err
}

// RecordRelease records a release of a project's secret to the vTPM
// (incarnation) of an instance, at the transaction's time: it holds again
// if it was revoked.
func (t *Tx) RecordRelease(project, name, instanceID, incarnation string) error {
	_, err := t.exec(`INSERT INTO secret_releases (project, name, instance_id, incarnation, released_at, releases)
		VALUES (?,?,?,?,?,1)
		ON CONFLICT(project, name, instance_id) DO UPDATE SET incarnation=excluded.incarnation, released_at=excluded.released_at,
			releases=secret_releases.releases+1, revoked_at='', reason='', told=0`,
		project, name, instanceID, incarnation, stamp(t.now))
	return err
}

const releaseColumns = `project, name, instance_id, incarnation, released_at, releases, revoked_at, reason`

func (t *Tx) releases(where string, args ...any) ([]Release, error) {
	rows, err := t.query(`SELECT `+releaseColumns+` FROM secret_releases `+where+` ORDER BY project, name, instance_id`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Release
	for rows.Next() {
		var r Release
		var at, revoked string
		if err := rows.Scan(&r.Project, &r.Name, &r.InstanceID, &r.Incarnation, &at, &r.Releases, &revoked, &r.Reason); err != nil {
			return nil, err
		}
		r.ReleasedAt = parseStamp(at)
		if revoked != "" {
			r.RevokedAt = parseStamp(revoked)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// ListReleases lists the releases of a project's secret, by instance.
func (t *Tx) ListReleases(project, name string) ([]Release, error) {
	return t.releases(`WHERE project=? AND name=?`, project, name)
}

// RevokeReleases revokes every release to instanceID that holds, for
// reason, at the transaction's time, and returns them (revoked).
func (t *Tx) RevokeReleases(instanceID, reason string) ([]Release, error) {
	held, err := t.releases(`WHERE instance_id=? AND revoked_at=''`, instanceID)
	if err != nil || len(held) == 0 {
		return nil, err
	}
	if _, err := t.exec(`UPDATE secret_releases SET revoked_at=?, reason=?, told=0 WHERE instance_id=? AND revoked_at=''`,
		stamp(t.now), reason, instanceID); err != nil {
		return nil, err
	}
	for i := range held {
		held[i].RevokedAt, held[i].Reason = t.now, reason
	}
	return held, nil
}

// TakeRevocations returns the names of instanceID's revoked releases its
// agent was not told of yet, and marks them told.
func (t *Tx) TakeRevocations(instanceID string) ([]string, error) {
	rs, err := t.releases(`WHERE instance_id=? AND revoked_at<>'' AND told=0`, instanceID)
	if err != nil || len(rs) == 0 {
		return nil, err
	}
	if _, err := t.exec(`UPDATE secret_releases SET told=1 WHERE instance_id=? AND revoked_at<>'' AND told=0`, instanceID); err != nil {
		return nil, err
	}
	names := make([]string, len(rs))
	for i, r := range rs {
		names[i] = r.Name
	}
	return names, nil
}

// BrokerSecretKeys lists the key-manager ids of the broker's secrets,
// which no orphan sweep may take.
func (t *Tx) BrokerSecretKeys() ([]string, error) {
	rows, err := t.query(`SELECT key_id FROM broker_secrets ORDER BY key_id`)
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
