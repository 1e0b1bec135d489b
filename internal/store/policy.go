package store

import (
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Policy is a named measured-boot reference that can be applied to
// instances or hosts, which take a copy. Project "" is the operator's,
// usable by every project.
type Policy struct {
	// ID is the policy's identity, which copies keep (an attestation's
	// PolicyID): a name deleted and made again is another policy.
	ID      string           `json:"-"`
	Project string           `json:"-"`
	Name    string           `json:"-"`
	PCRs    map[int][]byte   `json:"pcrs,omitempty"`
	Digests map[int][][]byte `json:"digests,omitempty"` // allowed per PCR
	// EventLog is the reference boot's log when the policy was learned;
	// it lets a mismatch be traced to an event.
	EventLog []byte `json:"event_log,omitempty"`
	// LearnedFrom is the attestation record it was learned from, if any.
	LearnedFrom string    `json:"learned_from,omitempty"`
	CreatedAt   time.Time `json:"-"`
}

// CreatePolicy stores p with a new ID; ErrExists if its project has one
// of that name.
func (t *Tx) CreatePolicy(p *Policy) error {
	doc, err := json.Marshal(p)
	if err != nil {
		return err
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return err
	}
	res, err := t.exec(`INSERT INTO policies (id, project, name, doc, created_at) VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING`,
		hex.EncodeToString(id), p.Project, p.Name, string(doc), stamp(t.now))
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("policy %s: %w", p.Name, ErrExists)
	}
	p.ID, p.CreatedAt = hex.EncodeToString(id), t.now
	return nil
}

// GetPolicy reads a project's policy; ErrNotFound if there is none.
func (t *Tx) GetPolicy(project, name string) (*Policy, error) {
	return t.getPolicy(`project=? AND name=?`, project, name)
}

// GetPolicyByID reads the policy whose ID is id; ErrNotFound if there is
// none (it was deleted, maybe made again under the same name).
func (t *Tx) GetPolicyByID(id string) (*Policy, error) {
	return t.getPolicy(`id=?`, id)
}

func (t *Tx) getPolicy(where string, args ...any) (*Policy, error) {
	p := &Policy{}
	var doc, at string
	err := t.queryRow(`SELECT id, project, name, doc, created_at FROM policies WHERE `+where, args...).Scan(&p.ID, &p.Project, &p.Name, &doc, &at)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("policy %v: %w", args[len(args)-1], ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	p.CreatedAt = parseStamp(at)
	return p, json.Unmarshal([]byte(doc), p)
}

// ListPolicies lists the policies of the given projects (all when none
// is given), by project and name.
func (t *Tx) ListPolicies(projects ...string) ([]*Policy, error) {
	q, args := `SELECT id, project, name, doc, created_at FROM policies`, []any{}
	if len(projects) > 0 {
		q += ` WHERE project IN (?` + strings.Repeat(",?", len(projects)-1) + `)`
		for _, p := range projects {
			args = append(args, p)
		}
	}
	rows, err := t.query(q+` ORDER BY project, name`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Policy
	for rows.Next() {
		p := &Policy{}
		var doc, at string
		if err := rows.Scan(&p.ID, &p.Project, &p.Name, &doc, &at); err != nil {
			return nil, err
		}
		if err := json.Unmarshal([]byte(doc), p); err != nil {
			return nil, fmt.Errorf("decoding policy %s: %w", p.Name, err)
		}
		p.CreatedAt = parseStamp(at)
		out = append(out, p)
	}
	return out, rows.Err()
}

// DeletePolicy removes a project's policy; ErrNotFound if there is none.
func (t *Tx) DeletePolicy(project, name string) error {
	res, err := t.exec(`DELETE FROM policies WHERE project=? AND name=?`, project, name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("policy %s: %w", name, ErrNotFound)
	}
	return nil
}
