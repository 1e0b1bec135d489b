package store

import (
	"errors"
	"time"
)

// Event is one entry of the append-only audit log: who did what, when.
type Event struct {
	ID         int64
	At         time.Time
	Actor      string // "api:<project>", "agent:<host>", ...
	InstanceID string
	Action     string // created, started, stopped, deleted, error, ...
	Detail     string // never secrets
	// Incarnation is the vTPM of InstanceID the event belongs to (see
	// VTPM.Incarnation), set by AppendEvent; "" when it belongs to none: a
	// host's events, and those from before incarnations were recorded
	// that no vTPM still has.
	Incarnation string
}

// AppendEvent records e at the transaction's time, for the vTPM of
// e.InstanceID that the transaction sees: the one it has, or the one this
// transaction deleted. So an instance id's events stay with the vTPM they
// happened to, and a later vTPM of the same id starts with none. A vTPM
// this transaction read or wrote is known without reading it again.
func (t *Tx) AppendEvent(e Event) error {
	incarnation, ok := t.incarnations[e.InstanceID]
	if !ok {
		err := t.queryRow(`SELECT incarnation FROM vtpms WHERE instance_id=?`, e.InstanceID).Scan(&incarnation)
		if err = notFound(err); err != nil && !errors.Is(err, ErrNotFound) {
			return err
		}
	}
	_, err := t.exec(`INSERT INTO events (at, actor, instance_id, action, detail, incarnation) VALUES (?,?,?,?,?,?)`,
		stamp(t.now), e.Actor, e.InstanceID, e.Action, e.Detail, incarnation)
	if err != nil {
		return err
	}
	t.fleetChanged()
	return nil
}

// ListEvents returns the events of one vTPM of an instance id (its
// Incarnation), oldest first; incarnation "" lists a host's events (key
// HostKey), or an instance id's that belong to no vTPM.
func (t *Tx) ListEvents(instanceID, incarnation string) ([]Event, error) {
	return t.events(`WHERE instance_id=? AND incarnation=?`, instanceID, incarnation)
}

// ListAllEvents returns every event of an instance id, of all the vTPMs it
// has had, oldest first: the operator's audit trail.
func (t *Tx) ListAllEvents(instanceID string) ([]Event, error) {
	return t.events(`WHERE instance_id=?`, instanceID)
}

func (t *Tx) events(where string, args ...any) ([]Event, error) {
	rows, err := t.query(`SELECT id, at, actor, instance_id, action, detail, incarnation FROM events `+where+` ORDER BY id`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Event
	for rows.Next() {
		var e Event
		var at string
		if err := rows.Scan(&e.ID, &at, &e.Actor, &e.InstanceID, &e.Action, &e.Detail, &e.Incarnation); err != nil {
			return nil, err
		}
		e.At = parseStamp(at)
		out = append(out, e)
	}
	return out, rows.Err()
}
