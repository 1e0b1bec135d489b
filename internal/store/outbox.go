package store

import (
	"database/sql"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
)

// The webhook outbox. A delivery is queued in the transaction of the
// change it announces (Enqueue), so it exists if and only if the change
// committed. Several servers may deliver from one outbox: each claims the
// deliveries it is about to make (ClaimDeliveries) until a lease runs
// out, and settles them (Delivered, Retry) only while its claim is still
// its own. Only the oldest waiting delivery of an instance can be
// claimed, so an instance's deliveries go out one at a time, in the order
// they were queued; a server that dies with a claim leaves it to the
// others once the lease runs out.

// Delivery is a webhook payload waiting in the outbox.
type Delivery struct {
	ID int64
	// InstanceID is whose verdict it announces; one instance's deliveries
	// are made in order.
	InstanceID string
	// DeliveryID is the same on every attempt (also by another server):
	// a receiver that got one twice drops the second.
	DeliveryID string
	Payload    []byte
	Attempts   int
	NextAt     time.Time // not before
	// ClaimedBy is the server delivering it until ClaimedUntil; "" when
	// none.
	ClaimedBy    string
	ClaimedUntil time.Time
}

// Enqueue adds a delivery of payload about instance id to the outbox, due
// at once, as part of this transaction: it is delivered if and only if
// the transaction commits, after the instance's earlier ones.
func (t *Tx) Enqueue(instanceID string, payload []byte) error {
	_, err := t.exec(`INSERT INTO outbox (instance_id, delivery_id, payload, next_at, created_at) VALUES (?,?,?,?,?)`,
		instanceID, uuid.NewString(), string(payload), sortable(t.now), stamp(t.now))
	t.outboxChanged()
	return err
}

// outboxChanged has this transaction's commit wake every server's
// deliverer (OutboxChanged).
func (t *Tx) outboxChanged() {
	if k := (topic{kind: outboxTopic}); !slices.Contains(t.changed, k) {
		t.changed = append(t.changed, k)
	}
}

const deliveryColumns = `id, instance_id, delivery_id, payload, attempts, next_at, claimed_by, claimed_until`

// firstOfItsInstance selects an outbox row o with no earlier row of the
// same instance: the only one of its instance that may be claimed.
const firstOfItsInstance = `NOT EXISTS (SELECT 1 FROM outbox e WHERE e.instance_id = o.instance_id AND e.id < o.id)`

// Deliveries lists up to limit waiting deliveries in the order they were
// queued, claimed or not.
func (t *Tx) Deliveries(limit int) ([]Delivery, error) {
	return t.deliveries(`SELECT `+deliveryColumns+` FROM outbox ORDER BY id LIMIT ?`, limit)
}

// ClaimDeliveries claims for holder, for lease from now, up to limit
// deliveries that are due and claimable: each the first waiting of its
// instance, unclaimed or its claim run out. They are the oldest such, in
// the order they were queued. On PostgreSQL the rows are locked as they
// are read, skipping those another server's claim is locking, so that
// servers claiming at once take different deliveries rather than collide.
func (t *Tx) ClaimDeliveries(holder string, lease time.Duration, limit int) ([]Delivery, error) {
	query := `SELECT ` + deliveryColumns + ` FROM outbox o
		WHERE next_at <= ? AND claimed_until <= ? AND ` + firstOfItsInstance + `
		ORDER BY id LIMIT ?`
	if t.pg {
		query += ` FOR UPDATE SKIP LOCKED`
	}
	now := sortable(t.now)
	ds, err := t.deliveries(query, now, now, limit)
	if err != nil || len(ds) == 0 {
		return nil, err
	}
	until := t.now.Add(lease)
	args := []any{holder, sortable(until)}
	for i := range ds {
		ds[i].ClaimedBy, ds[i].ClaimedUntil = holder, until.UTC()
		args = append(args, ds[i].ID)
	}
	in := strings.Repeat(",?", len(ds))[1:]
	if _, err := t.exec(`UPDATE outbox SET claimed_by=?, claimed_until=? WHERE id IN (`+in+`)`, args...); err != nil {
		return nil, err
	}
	return ds, nil
}

// NextClaim is when a delivery can next be claimed (it may be now, or
// past): the earliest time a first waiting delivery of its instance is
// due with no claim running. ok is false when the outbox is empty.
func (t *Tx) NextClaim() (at time.Time, ok bool, err error) {
	var next sql.NullString
	err = t.queryRow(`SELECT MIN(CASE WHEN claimed_until > next_at THEN claimed_until ELSE next_at END)
		FROM outbox o WHERE ` + firstOfItsInstance).Scan(&next)
	if err != nil || !next.Valid {
		return time.Time{}, false, err
	}
	at, err = time.Parse(sortableLayout, next.String)
	return at, err == nil, err
}

// Delivered removes a delivery holder claimed from the outbox (done, or
// given up). held is false, and nothing changes, when the claim is no
// longer holder's: its lease ran out and another server took the delivery
// over (or made it already).
func (t *Tx) Delivered(id int64, holder string) (held bool, err error) {
	t.outboxChanged() // the instance's next may be claimed now
	return changedRow(t.exec(`DELETE FROM outbox WHERE id=? AND claimed_by=?`, id, holder))
}

// Retry records a failed attempt at a delivery holder claimed, and
// releases it, due again after wait. held is as for Delivered.
func (t *Tx) Retry(id int64, holder string, wait time.Duration) (held bool, err error) {
	t.outboxChanged()
	return changedRow(t.exec(`UPDATE outbox SET attempts=attempts+1, next_at=?, claimed_by='', claimed_until='' WHERE id=? AND claimed_by=?`,
		sortable(t.now.Add(wait)), id, holder))
}

// changedRow reports whether a statement changed a row.
func changedRow(res sql.Result, err error) (bool, error) {
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	return n > 0, err
}

func (t *Tx) deliveries(query string, args ...any) ([]Delivery, error) {
	rows, err := t.query(query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Delivery
	for rows.Next() {
		var d Delivery
		var payload, next, until string
		if err := rows.Scan(&d.ID, &d.InstanceID, &d.DeliveryID, &payload, &d.Attempts, &next, &d.ClaimedBy, &until); err != nil {
			return nil, err
		}
		d.Payload = []byte(payload)
		if d.NextAt, err = time.Parse(sortableLayout, next); err != nil {
			return nil, err
		}
		if until != "" {
			if d.ClaimedUntil, err = time.Parse(sortableLayout, until); err != nil {
				return nil, err
			}
		}
		out = append(out, d)
	}
	return out, rows.Err()
}
