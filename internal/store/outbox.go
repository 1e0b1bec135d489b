package store

import "time"

// Delivery is a webhook payload waiting in the outbox.
type Delivery struct {
	ID       int64
	Payload  []byte
	Attempts int
	NextAt   time.Time // not before
}

// Enqueue adds payload to the outbox, due at once, as part of this
// transaction: it is delivered if and only if the transaction commits.
func (t *Tx) Enqueue(payload []byte) error {
	_, err := t.exec(`INSERT INTO outbox (payload, next_at, created_at) VALUES (?,?,?)`, string(payload), sortable(t.now), stamp(t.now))
	return err
}

// Deliveries lists up to limit waiting deliveries in the order they were
// queued.
func (t *Tx) Deliveries(limit int) ([]Delivery, error) {
	rows, err := t.query(`SELECT id, payload, attempts, next_at FROM outbox ORDER BY id LIMIT ?`, limit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Delivery
	for rows.Next() {
		var d Delivery
		var payload, next string
		if err := rows.Scan(&d.ID, &payload, &d.Attempts, &next); err != nil {
			return nil, err
		}
		d.Payload = []byte(payload)
		if d.NextAt, err = time.Parse(sortableLayout, next); err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

// Delivered removes a delivery from the outbox (done, or given up).
func (t *Tx) Delivered(id int64) error {
	_, err := t.exec(`DELETE FROM outbox WHERE id=?`, id)
	return err
}

// Retry records a failed attempt and when to try again.
func (t *Tx) Retry(id int64, next time.Time) error {
	_, err := t.exec(`UPDATE outbox SET attempts=attempts+1, next_at=? WHERE id=?`, sortable(next), id)
	return err
}
