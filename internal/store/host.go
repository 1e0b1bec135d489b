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
	// Version is the vtpmd build its agent runs, as the agent last said.
	Version string
	// HeartbeatAt is when its agent was last heard from: its last
	// heartbeat or registration.
	HeartbeatAt time.Time
	// Draining is the operator's: no new vTPMs are placed on the host.
	Draining bool
	// AgentRun names the run (one start of its process) of the agent
	// that registered the host last; "" for an agent that names none. A
	// transfer that run took (TakeTransfer) is not handed to it again.
	AgentRun string
}

// PutHost registers a host, or records again what it offers (traits,
// capacity, backend), runs (version) and which run of its agent
// registers it (AgentRun), with a heartbeat now. An operator's drain
// stays as it was.
func (t *Tx) PutHost(h *Host) error {
	traits, err := json.Marshal(h.Traits)
	if err != nil {
		return err
	}
	_, err = t.exec(`INSERT INTO hosts (name, traits, capacity, backend, version, heartbeat_at, agent_run) VALUES (?,?,?,?,?,?,?)
		ON CONFLICT(name) DO UPDATE SET traits=excluded.traits, capacity=excluded.capacity,
		backend=excluded.backend, version=excluded.version, heartbeat_at=excluded.heartbeat_at, agent_run=excluded.agent_run`,
		h.Name, string(traits), h.Capacity, h.Backend, h.Version, stamp(t.now), h.AgentRun)
	if err != nil {
		return err
	}
	h.HeartbeatAt = t.now
	return nil
}

// Heartbeat records that host's agent, running version, is alive now;
// ErrNotFound if the host was never registered.
func (t *Tx) Heartbeat(host, version string) error {
	res, err := t.exec(`UPDATE hosts SET heartbeat_at=?, version=? WHERE name=?`, stamp(t.now), version, host)
	if err != nil {
		return err
	}
	if n, err := res.RowsAffected(); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("host %s: %w", host, ErrNotFound)
	}
	return nil
}

// SetDraining sets or clears a host's drain and reports whether that
// changed it; ErrNotFound if the host is unknown.
func (t *Tx) SetDraining(host string, draining bool) (changed bool, err error) {
	h, err := t.GetHost(host)
	if err != nil || h.Draining == draining {
		return false, err
	}
	flag := 0
	if draining {
		flag = 1
	}
	_, err = t.exec(`UPDATE hosts SET draining=? WHERE name=?`, flag, host)
	return err == nil, err
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

const hostColumns = `name, traits, capacity, backend, version, heartbeat_at, draining, agent_run`

func (t *Tx) hosts(where string, args ...any) ([]*Host, error) {
	rows, err := t.query(`SELECT `+hostColumns+` FROM hosts `+where+` ORDER BY name`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Host
	for rows.Next() {
		var h Host
		if err := scanHost(rows, &h); err != nil {
			return nil, err
		}
		out = append(out, &h)
	}
	return out, rows.Err()
}

// scanHost reads hostColumns into h, and whatever columns follow into
// more.
func scanHost(row interface{ Scan(...any) error }, h *Host, more ...any) error {
	var traits, heartbeat string
	var draining int
	if err := row.Scan(append([]any{&h.Name, &traits, &h.Capacity, &h.Backend, &h.Version, &heartbeat, &draining, &h.AgentRun}, more...)...); err != nil {
		return err
	}
	if err := json.Unmarshal([]byte(traits), &h.Traits); err != nil {
		return fmt.Errorf("decoding traits of host %s: %w", h.Name, err)
	}
	h.HeartbeatAt, h.Draining = parseStamp(heartbeat), draining != 0
	return nil
}

// HostLoad is a host with what it holds: its vTPMs, and its host
// certificates neither revoked nor expired.
type HostLoad struct {
	Host
	VTPMs        int
	Certificates int
}

// ListHostLoads returns every host with its load at now (certificates
// expire), by name, in one read: what placement weighs.
func (t *Tx) ListHostLoads(now time.Time) ([]*HostLoad, error) {
	rows, err := t.query(`SELECT `+hostColumns+`,
		(SELECT COUNT(*) FROM vtpms v WHERE v.host = hosts.name),
		(SELECT COUNT(*) FROM host_certificates c WHERE c.host = hosts.name AND c.revoked_at = '' AND c.not_after > ?)
		FROM hosts ORDER BY name`, stamp(now))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*HostLoad
	for rows.Next() {
		var h HostLoad
		if err := scanHost(rows, &h.Host, &h.VTPMs, &h.Certificates); err != nil {
			return nil, err
		}
		out = append(out, &h)
	}
	return out, rows.Err()
}
