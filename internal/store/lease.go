package store

import "time"

// Leases: a periodic job that servers sharing the database must do once,
// not once each (the stale sweep), is done by whichever holds its lease.
// Each run first takes or renews the lease; a server that stops renewing
// (it died, or stopped) leaves it to another once it expires. Times are
// the Store's clock: servers sharing a database must keep their clocks in
// step (NTP), as their tokens already require.

// TakeLease takes the lease called name for holder until ttl from now, or
// renews it if holder holds it, and reports whether holder holds it: false
// while another holder's lease on it has not expired.
func (t *Tx) TakeLease(name, holder string, ttl time.Duration) (bool, error) {
	now := sortable(t.now)
	return changedRow(t.exec(`INSERT INTO leases (name, holder, expires_at) VALUES (?,?,?)
		ON CONFLICT (name) DO UPDATE SET holder=excluded.holder, expires_at=excluded.expires_at
		WHERE leases.holder=excluded.holder OR leases.expires_at<=?`,
		name, holder, sortable(t.now.Add(ttl)), now))
}

// LeaseHolder is who holds (or last held) the lease called name, and
// until when; ErrNotFound when no one has taken it.
func (t *Tx) LeaseHolder(name string) (holder string, until time.Time, err error) {
	var expires string
	err = t.queryRow(`SELECT holder, expires_at FROM leases WHERE name=?`, name).Scan(&holder, &expires)
	if err != nil {
		return "", time.Time{}, notFound(err)
	}
	until, err = time.Parse(sortableLayout, expires)
	return holder, until, err
}
