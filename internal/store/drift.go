package store

import (
	"fmt"
	"time"
)

// Drift is what differs between a host and its records, as its agent
// finds it when the operator asks: a request the host's watch carries
// (Changes.DriftAsked), and the agent's answer.
type Drift struct {
	// Asked counts the operator's requests; Repair says the last asks for
	// orphans to be deleted.
	Asked  int64
	Repair bool
	// Answered is the request the agent last answered, with Findings (JSON,
	// the API's) at At.
	Answered int64
	Findings []byte
	At       time.Time
}

// AskDrift records a request for host's drift, to delete orphans with
// repair, and returns its number: the host's watchers wake to it. A repair
// asked stays asked until answered.
func (t *Tx) AskDrift(host string, repair bool) (int64, error) {
	var asked int64
	err := t.queryRow(`UPDATE hosts SET drift_asked = drift_asked + 1,
		drift_repair = CASE WHEN ? = 1 OR (drift_repair = 1 AND drift_answered < drift_asked) THEN 1 ELSE 0 END
		WHERE name = ? RETURNING drift_asked`, boolInt(repair), host).Scan(&asked)
	if err != nil {
		return 0, fmt.Errorf("host %s: %w", host, notFound(err))
	}
	t.changed = append(t.changed, topic{kind: hostTopic, name: host})
	return asked, nil
}

// AnswerDrift records the agent's answer to request answered: findings,
// JSON. Its waiters wake.
func (t *Tx) AnswerDrift(host string, answered int64, findings []byte) error {
	res, err := t.exec(`UPDATE hosts SET drift_answered = ?, drift_findings = ?, drift_at = ?,
		drift_repair = CASE WHEN drift_asked > ? THEN drift_repair ELSE 0 END WHERE name = ?`,
		answered, string(findings), stamp(t.now), answered, host)
	if err != nil {
		return err
	}
	if n, err := res.RowsAffected(); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("host %s: %w", host, ErrNotFound)
	}
	t.changed = append(t.changed, topic{kind: hostTopic, name: host})
	return nil
}

// GetDrift reads host's drift request and answer; ErrNotFound if the host
// is unknown.
func (t *Tx) GetDrift(host string) (*Drift, error) {
	var d Drift
	var repair int
	var findings, at string
	err := t.queryRow(`SELECT drift_asked, drift_repair, drift_answered, drift_findings, drift_at FROM hosts WHERE name = ?`, host).
		Scan(&d.Asked, &repair, &d.Answered, &findings, &at)
	if err != nil {
		return nil, fmt.Errorf("host %s: %w", host, notFound(err))
	}
	d.Repair, d.Findings, d.At = repair != 0, []byte(findings), parseStamp(at)
	return &d, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
