package store

import (
	"encoding/json"
	"fmt"
	"time"
)

// Host is a hypervisor host with an agent.
type Host struct {
	Name     string
	Traits   []string // sorted
	Capacity int      // how many vTPMs it may hold
	Backend  string   // swtpm, libvirt, xen, hyperv
	SeenAt   time.Time
}

// PutHost inserts or replaces a host and marks it seen now.
func (t *Tx) PutHost(h *Host) error {
	traits, err := json.Marshal(h.Traits)
	if err != nil {
		return err
	}
	h.SeenAt = t.now
	_, err = t.exec(`INSERT INTO hosts (name, traits, capacity, backend, seen_at) VALUES (?,?,?,?,?)
		ON CONFLICT(name) DO UPDATE SET traits=excluded.traits, capacity=excluded.capacity,
		backend=excluded.backend, seen_at=excluded.seen_at`,
		h.Name, string(traits), h.Capacity, h.Backend, stamp(t.now))
	return err
}

// GetHost reads one host; ErrNotFound if unknown.
func (t *Tx) GetHost(name string) (*Host, error) {
	hs, err := t.hosts(`WHERE name=?`, name)
	if err != nil {
		return nil, err
	}
	if len(hs) == 0 {
		return nil, fmt.Errorf("host %s: %w", name, ErrNotFound)
	}
	return hs[0], nil
}

// ListHosts returns every host, by name.
func (t *Tx) ListHosts() ([]*Host, error) { return t.hosts("") }

func (t *Tx) hosts(where string, args ...any) ([]*Host, error) {
	rows, err := t.query(`SELECT name, traits, capacity, backend, seen_at FROM hosts `+where+` ORDER BY name`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Host
	for rows.Next() {
		var h Host
		var traits, seen string
		if err := rows.Scan(&h.Name, &traits, &h.Capacity, &h.Backend, &seen); err != nil {
			return nil, err
		}
		if err := json.Unmarshal([]byte(traits), &h.Traits); err != nil {
			return nil, fmt.Errorf("decoding traits of host %s: %w", h.Name, err)
		}
		h.SeenAt = parseStamp(seen)
		out = append(out, &h)
	}
	return out, rows.Err()
}
