package store

import "time"

// Event is one entry of the append-only audit log: who did what, when.
type Event struct {
	ID         int64
	At         time.Time
	Actor      string // "api:<project>", "agent:<host>", ...
	InstanceID string
	Action     string // created, started, stopped, deleted, error, ...
	Detail     string // never secrets
}

// AppendEvent records e at the transaction's time.
func (t *Tx) AppendEvent(e Event) error {
	_, err := t.exec(`INSERT INTO events (at, actor, instance_id, action, detail) VALUES (?,?,?,?,?)`,
		stamp(t.now), e.Actor, e.InstanceID, e.Action, e.Detail)
	return err
}

// ListEvents returns an instance's events, oldest first.
func (t *Tx) ListEvents(instanceID string) ([]Event, error) {
	rows, err := t.query(
		`SELECT id, at, actor, instance_id, action, detail FROM events WHERE instance_id=? ORDER BY id`, instanceID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Event
	for rows.Next() {
		var e Event
		var at string
		if err := rows.Scan(&e.ID, &at, &e.Actor, &e.InstanceID, &e.Action, &e.Detail); err != nil {
			return nil, err
		}
		e.At = parseStamp(at)
		out = append(out, e)
	}
	return out, rows.Err()
}
