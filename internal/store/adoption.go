package store

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"
)

// Adoption is the operator's request that a host's agent look at a
// libvirt domain whose vTPM vtpmd did not make (Nova's), for the vTPM of
// InstanceID: the host's watch carries it (Changes.Adoptions) until the
// agent answers. Asking again for the same instance and host replaces the
// request, and an answer to the one replaced is refused.
type Adoption struct {
	ID         string // random; names this request
	Host       string
	InstanceID string
	Domain     string
	SecretID   string // the secret the operator named; "" for the domain's
	// Answer is the agent's answer (JSON, the API's AgentAdoption); nil
	// until it answers.
	Answer  []byte
	AskedAt time.Time
}

// AskAdoption records a's request, with a new ID, in place of any earlier
// one of the same instance and host; the host's watchers wake to it.
func (t *Tx) AskAdoption(a *Adoption) error {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return err
	}
	a.ID, a.Answer, a.AskedAt = hex.EncodeToString(id), nil, t.now
	_, err := t.exec(`INSERT INTO adoptions (host, instance_id, id, domain, secret_id, answer, asked_at) VALUES (?,?,?,?,?,'',?)
		ON CONFLICT (host, instance_id) DO UPDATE SET id=excluded.id, domain=excluded.domain, secret_id=excluded.secret_id,
		answer='', asked_at=excluded.asked_at`,
		a.Host, a.InstanceID, a.ID, a.Domain, a.SecretID, stamp(t.now))
	if err != nil {
		return err
	}
	t.changed = append(t.changed, topic{kind: hostTopic, name: a.Host})
	return nil
}

// GetAdoption reads host's request id; ErrNotFound if it has none of that
// id (never asked, replaced or withdrawn).
func (t *Tx) GetAdoption(host, id string) (*Adoption, error) {
	a := &Adoption{}
	var answer, at string
	err := t.queryRow(`SELECT id, host, instance_id, domain, secret_id, answer, asked_at FROM adoptions WHERE host=? AND id=?`, host, id).
		Scan(&a.ID, &a.Host, &a.InstanceID, &a.Domain, &a.SecretID, &answer, &at)
	if err != nil {
		return nil, fmt.Errorf("adoption %s on host %s: %w", id, host, notFound(err))
	}
	if answer != "" {
		a.Answer = []byte(answer)
	}
	a.AskedAt = parseStamp(at)
	return a, nil
}

// AnswerAdoption records host's answer to its request id, once; ErrNotFound
// if the host has no such request waiting. Its waiters wake.
func (t *Tx) AnswerAdoption(host, id string, answer []byte) error {
	res, err := t.exec(`UPDATE adoptions SET answer=? WHERE host=? AND id=? AND answer=''`, string(answer), host, id)
	if err != nil {
		return err
	}
	if n, err := res.RowsAffected(); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("adoption %s on host %s: %w", id, host, ErrNotFound)
	}
	t.changed = append(t.changed, topic{kind: hostTopic, name: host})
	return nil
}

// WithdrawAdoptions removes the requests of instanceID on every host:
// the server that asked has its answer, or gave up.
func (t *Tx) WithdrawAdoptions(instanceID string) error {
	_, err := t.exec(`DELETE FROM adoptions WHERE instance_id=?`, instanceID)
	return err
}

// pendingAdoptions are host's requests its agent has not answered.
func (t *Tx) pendingAdoptions(host string) ([]Adoption, error) {
	rows, err := t.query(`SELECT id, instance_id, domain, secret_id, asked_at FROM adoptions WHERE host=? AND answer='' ORDER BY asked_at, instance_id`, host)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Adoption
	for rows.Next() {
		a := Adoption{Host: host}
		var at string
		if err := rows.Scan(&a.ID, &a.InstanceID, &a.Domain, &a.SecretID, &at); err != nil {
			return nil, err
		}
		a.AskedAt = parseStamp(at)
		out = append(out, a)
	}
	return out, rows.Err()
}

// SecretKeys returns the instance id of the vTPM whose state secretID
// keys, or whose old TPM's a pending resize keeps; ErrNotFound if none
// does.
func (t *Tx) SecretKeys(secretID string) (string, error) {
	var id string
	err := t.queryRow(`SELECT instance_id FROM vtpms WHERE secret_id=? OR resize LIKE ?`,
		secretID, `%"old_secret_id":"`+secretID+`"%`).Scan(&id)
	if err != nil {
		return "", fmt.Errorf("vtpm keyed by secret %s: %w", secretID, notFound(err))
	}
	return id, nil
}
