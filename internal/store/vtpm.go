package store

import (
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/internal/spec"
)

// Phase is where a vTPM is in its life, as the host agent observes it:
// pending → provisioning → active ⇄ stopped → deleting → (record removed);
// error, with a reason, from any of them. The control plane sets the
// phases of a move, which agents leave alone: stopped → shelving → shelved
// (no host) → unshelving → stopped.
type Phase string

// The phases.
const (
	PhasePending      Phase = "pending"
	PhaseProvisioning Phase = "provisioning"
	PhaseActive       Phase = "active"
	PhaseStopped      Phase = "stopped"
	PhaseDeleting     Phase = "deleting"
	PhaseError        Phase = "error"
	// PhaseShelving: its state is being put on the shelf (exported, then
	// removed from its host); the server finishes it.
	PhaseShelving Phase = "shelving"
	// PhaseShelved: on no host; the server holds its state bundle.
	PhaseShelved Phase = "shelved"
	// PhaseUnshelving: placed on a host again, whose agent is importing
	// the shelved bundle; the server finishes it.
	PhaseUnshelving Phase = "unshelving"
)

// Desired is what the user asked for; agents move Phase towards it.
type Desired string

// The desired states.
const (
	DesiredRunning Desired = "running"
	DesiredStopped Desired = "stopped"
	DesiredDeleted Desired = "deleted"
)

// EK is an endorsement key of a manufactured vTPM.
type EK struct {
	Kind      string `json:"kind"`
	Handle    uint32 `json:"handle"`
	NVIndex   uint32 `json:"nv_index,omitempty"`
	PublicDER []byte `json:"public_der"` // PKIX
	CertDER   []byte `json:"cert_der,omitempty"`
}

// Sockets are a vTPM's unix sockets: TPM commands on Data, swtpm's
// control channel on Ctrl; both "" for none.
type Sockets struct {
	Data string
	Ctrl string
}

// VTPM is one instance's virtual TPM.
type VTPM struct {
	InstanceID string
	Project    string
	Spec       spec.Spec
	Host       string
	Desired    Desired
	Phase      Phase
	Reason     string // why Phase is error
	SecretID   string // key-manager secret that encrypts the state
	EKs        []EK
	// Domain is the libvirt domain the vTPM is attached to; "" for none.
	Domain string
	// Sockets are where the host's agent last found the vTPM served; none
	// while it does not run, and on a backend whose clients reach it
	// otherwise (a Xen stub domain, libvirt's own swtpm).
	Sockets Sockets
	// PID is the swtpm process the host's agent last found serving the
	// vTPM on its host; 0 while it does not run, and where vtpmd does not
	// run it (libvirt's own swtpm, a Xen stub domain).
	PID int
	// Connected says a client (a guest's QEMU) held the vTPM's control
	// channel when its agent last looked.
	Connected bool
	// Resize is the vTPM's resize awaiting confirm or revert; nil for none.
	Resize *Resize
	// Generation increases with every update; UpdateVTPM refuses a stale one.
	Generation int64
	// Incarnation tells this vTPM from the earlier ones of the same
	// instance id: CreateVTPM gives each a new one, and the events and
	// attestation of one are never another's.
	Incarnation string
	// Revision is the host's watch revision at this record's last write
	// (see WatchVTPMs); CreateVTPM and UpdateVTPM set it, callers only
	// read it.
	Revision  int64
	CreatedAt time.Time
	UpdatedAt time.Time
}

// ResizeStatus is where a resize is.
type ResizeStatus string

// The statuses of a resize.
const (
	// ResizeResized: done as far as the control plane goes; it awaits
	// confirm or revert.
	ResizeResized ResizeStatus = "resized"
	// ResizeConfirming: confirmed; the host's agent is removing the old
	// TPM (kind new_tpm only: the others end at once).
	ResizeConfirming ResizeStatus = "confirming"
	// ResizeReverting: reverted; the host's agent is putting the old TPM
	// back in place of the new one (kind new_tpm only).
	ResizeReverting ResizeStatus = "reverting"
)

// Resize is a vTPM's pending resize: what it was before, so that a revert
// can restore exactly that.
type Resize struct {
	Status ResizeStatus    `json:"status"`
	Kind   spec.ResizeKind `json:"kind"`
	// From is the spec before; nil when the instance had no vTPM.
	From *spec.Spec `json:"from,omitempty"`
	// To is the spec after; nil when the new flavor asks for none.
	To *spec.Spec `json:"to,omitempty"`
	// OldSecretID keys the old TPM's state, set aside until confirm (kind
	// new_tpm): no record other than this names it meanwhile.
	OldSecretID string `json:"old_secret_id,omitempty"`
	// OldEKs are the old TPM's endorsement keys, restored by a revert.
	OldEKs []EK `json:"old_eks,omitempty"`
	// OldDesired is what was asked of the vTPM before a resize that
	// stopped it (kind remove), restored by a revert.
	OldDesired  Desired   `json:"old_desired,omitempty"`
	RequestedAt time.Time `json:"requested_at"`
}

const vtpmColumns = `instance_id, project, version, model, secret_security, hypervisor, keys, host,
	desired, phase, reason, secret_id, eks, domain, data_socket, ctrl_socket, swtpm_pid, guest_connected, resize, generation, incarnation, revision, created_at, updated_at`

// CreateVTPM inserts v with generation 1 and a new Incarnation; ErrExists
// if the instance has a vTPM. A new vTPM starts with no attestation, as
// DeleteVTPM took the last one's (and migration 17 those that earlier
// versions left behind).
func (t *Tx) CreateVTPM(v *VTPM) error {
	keys, eks, resize, err := encodeLists(v)
	if err != nil {
		return err
	}
	incarnation := make([]byte, 16)
	if _, err := rand.Read(incarnation); err != nil {
		return err
	}
	revision, err := t.revision(v.Host)
	if err != nil {
		return err
	}
	v.Incarnation = hex.EncodeToString(incarnation)
	v.Generation, v.Revision, v.CreatedAt, v.UpdatedAt = 1, revision, t.now, t.now
	// An existing record is found by the insert itself, so it means the
	// same on every engine (on PostgreSQL, one another transaction
	// committed after this one began aborts it, and run retries).
	res, err := t.exec(`INSERT INTO vtpms (`+vtpmColumns+`) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
		ON CONFLICT (instance_id) DO NOTHING`,
		v.InstanceID, v.Project, v.Spec.Version, v.Spec.Model, v.Spec.SecretSecurity, v.Spec.Hypervisor, keys, hostColumn(v.Host),
		v.Desired, v.Phase, v.Reason, v.SecretID, eks, v.Domain, v.Sockets.Data, v.Sockets.Ctrl, v.PID, boolInt(v.Connected), resize, v.Generation, v.Incarnation, v.Revision, stamp(t.now), stamp(t.now))
	if err != nil {
		return err
	}
	if n, err := res.RowsAffected(); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("vtpm %s: %w", v.InstanceID, ErrExists)
	}
	t.wrote(v.InstanceID, v.Incarnation)
	return nil
}

// UpdateVTPM writes v back if nobody changed it since it was read (same
// Generation of the same Incarnation), and bumps its Generation;
// ErrConflict otherwise, ErrNotFound if the instance has no vTPM. A read of
// a deleted vTPM never writes over a newer one of the same instance id. A
// change of Host moves the vTPM: it leaves a tombstone on the old host.
func (t *Tx) UpdateVTPM(v *VTPM) error {
	keys, eks, resize, err := encodeLists(v)
	if err != nil {
		return err
	}
	// Read in this transaction, so the write below is to what was read.
	var was sql.NullString // the host it is on; none while shelved
	err = t.queryRow(`SELECT host FROM vtpms WHERE instance_id=? AND generation=? AND incarnation=?`,
		v.InstanceID, v.Generation, v.Incarnation).Scan(&was)
	if errors.Is(err, sql.ErrNoRows) {
		cur, gerr := t.GetVTPM(v.InstanceID)
		switch {
		case gerr != nil:
			return gerr
		case cur.Incarnation != v.Incarnation:
			return fmt.Errorf("vtpm %s of incarnation %s: %w", v.InstanceID, v.Incarnation, ErrNotFound)
		}
		return fmt.Errorf("vtpm %s: %w", v.InstanceID, ErrConflict)
	} else if err != nil {
		return err
	}
	var revision int64 // a shelved vTPM's: no host watches it
	if v.Host != "" {
		if revision, err = t.revision(v.Host); err != nil {
			return err
		}
	}
	_, err = t.exec(`UPDATE vtpms SET project=?, version=?, model=?, secret_security=?, hypervisor=?, keys=?, host=?,
		desired=?, phase=?, reason=?, secret_id=?, eks=?, domain=?, data_socket=?, ctrl_socket=?, swtpm_pid=?, guest_connected=?, resize=?, generation=generation+1, revision=?, updated_at=?
		WHERE instance_id=?`,
		v.Project, v.Spec.Version, v.Spec.Model, v.Spec.SecretSecurity, v.Spec.Hypervisor, keys, hostColumn(v.Host),
		v.Desired, v.Phase, v.Reason, v.SecretID, eks, v.Domain, v.Sockets.Data, v.Sockets.Ctrl, v.PID, boolInt(v.Connected), resize, revision, stamp(t.now), v.InstanceID)
	if err != nil {
		return err
	}
	if was.Valid && was.String != v.Host {
		if err := t.tombstone(was.String, v.InstanceID, v.Incarnation); err != nil {
			return err
		}
	}
	v.Generation++
	v.Revision, v.UpdatedAt = revision, t.now
	t.wrote(v.InstanceID, v.Incarnation)
	return nil
}

// Observation is what a host's agent observed of a vTPM it holds as of
// Generation of Incarnation: all of a record an agent writes.
type Observation struct {
	InstanceID  string
	Incarnation string
	Generation  int64
	// Host is the agent's: the vTPM must be placed there.
	Host      string
	Phase     Phase
	Reason    string
	EKs       []EK
	Sockets   Sockets
	PID       int
	Connected bool
}

// ObserveVTPM records o in one write, checked by the write itself: the
// vTPM is o's incarnation, unchanged since o's generation, placed on
// o.Host, and its endorsement keys are none yet or o's (once recorded
// they never change). It returns the vTPM's new generation and the secret
// it names; ok false, with nothing of the vTPM written, when one of those
// does not hold, for the caller to read which and roll back. The host's
// watchers are not woken for it: its agent knows what it observed, and
// they read the write at their next wake (see quietRevision).
func (t *Tx) ObserveVTPM(o Observation) (generation int64, secretID string, ok bool, err error) {
	e, err := json.Marshal(o.EKs)
	if err != nil {
		return 0, "", false, err
	}
	revision, err := t.quietRevision(o.Host)
	if err != nil {
		return 0, "", false, err
	}
	err = t.queryRow(`UPDATE vtpms SET phase=?, reason=?, eks=?, data_socket=?, ctrl_socket=?, swtpm_pid=?, guest_connected=?,
		generation=generation+1, revision=?, updated_at=?
		WHERE instance_id=? AND incarnation=? AND generation=? AND host=? AND (eks=? OR eks IN ('null', '[]'))
		RETURNING generation, secret_id`,
		o.Phase, o.Reason, string(e), o.Sockets.Data, o.Sockets.Ctrl, o.PID, boolInt(o.Connected), revision, stamp(t.now),
		o.InstanceID, o.Incarnation, o.Generation, o.Host, string(e)).Scan(&generation, &secretID)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, "", false, nil
	}
	if err != nil {
		return 0, "", false, err
	}
	t.wrote(o.InstanceID, o.Incarnation)
	return generation, secretID, true, nil
}

// DeleteVTPM removes the record, and the vTPM's attestation record and
// state bundles (its backups: they open only with its secret, which goes
// with it) with it; ErrNotFound if there is none. Events appended after it in the same
// transaction still belong to the deleted vTPM (see AppendEvent).
func (t *Tx) DeleteVTPM(instanceID string) error {
	var incarnation string
	var host sql.NullString
	err := t.queryRow(`SELECT incarnation, host FROM vtpms WHERE instance_id=?`, instanceID).Scan(&incarnation, &host)
	if err != nil {
		return fmt.Errorf("vtpm %s: %w", instanceID, notFound(err))
	}
	if _, err := t.exec(`DELETE FROM vtpms WHERE instance_id=?`, instanceID); err != nil {
		return err
	}
	if err := t.DeleteAttestation(instanceID); err != nil {
		return err
	}
	if err := t.deleteBundles(instanceID); err != nil {
		return err
	}
	if host.Valid {
		if err := t.tombstone(host.String, instanceID, incarnation); err != nil {
			return err
		}
	}
	t.wrote(instanceID, incarnation)
	return nil
}

// wrote notes that this transaction wrote (made, updated or deleted) the
// vTPM of instanceID of incarnation: its waiters wake at the commit, and
// the events appended after it are that vTPM's (AppendEvent).
func (t *Tx) wrote(instanceID, incarnation string) {
	t.saw(instanceID, incarnation)
	t.changed = append(t.changed, topic{kind: vtpmTopic, name: instanceID})
	t.fleetChanged()
}

// saw notes that instanceID's vTPM is of incarnation as of this
// transaction (it read or wrote it), so that AppendEvent need not read it
// again.
func (t *Tx) saw(instanceID, incarnation string) {
	if t.incarnations == nil {
		t.incarnations = map[string]string{}
	}
	t.incarnations[instanceID] = incarnation
}

// fleetChanged notes that this transaction changed what FleetChanged's
// waiters watch; once is enough.
func (t *Tx) fleetChanged() {
	if !slices.Contains(t.changed, topic{kind: fleetTopic}) {
		t.changed = append(t.changed, topic{kind: fleetTopic})
	}
}

// GetVTPM reads one vTPM; ErrNotFound if there is none.
func (t *Tx) GetVTPM(instanceID string) (*VTPM, error) {
	row := t.queryRow(`SELECT `+vtpmColumns+` FROM vtpms WHERE instance_id=?`, instanceID)
	v, err := scanVTPM(row)
	if err != nil {
		return nil, fmt.Errorf("vtpm %s: %w", instanceID, notFound(err))
	}
	t.saw(v.InstanceID, v.Incarnation)
	return v, nil
}

// Filter selects vTPMs; empty fields match everything.
type Filter struct {
	Project string
	Host    string
	Phase   Phase
	// After is the last instance id of the previous page.
	After string
	// Limit caps the page; 0 means no limit.
	Limit int
}

// ListVTPMs returns the vTPMs matching f, ordered by instance id.
func (t *Tx) ListVTPMs(f Filter) ([]*VTPM, error) {
	var where []string
	var args []any
	for _, c := range []struct{ col, val string }{
		{"project", f.Project}, {"host", f.Host}, {"phase", string(f.Phase)},
	} {
		if c.val != "" {
			where = append(where, c.col+"=?")
			args = append(args, c.val)
		}
	}
	if f.After != "" {
		where = append(where, "instance_id>?")
		args = append(args, f.After)
	}
	q := `SELECT ` + vtpmColumns + ` FROM vtpms`
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY instance_id"
	if f.Limit > 0 {
		q += " LIMIT ?"
		args = append(args, f.Limit)
	}
	rows, err := t.query(q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*VTPM
	for rows.Next() {
		v, err := scanVTPM(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// Room is how many more vTPMs host may take: its capacity less the vTPMs
// placed on it (0 or less when full); ErrNotFound if the host is unknown.
// Read in the transaction that places one there, it keeps the host within
// its capacity whatever runs at the same time: on PostgreSQL writes are
// serializable, so of two transactions that each saw the last room and
// placed a vTPM, one is aborted and runs again; SQLite runs one writer at
// a time.
func (t *Tx) Room(host string) (int, error) {
	var room int
	err := t.queryRow(`SELECT capacity - (SELECT COUNT(*) FROM vtpms WHERE host=?) FROM hosts WHERE name=?`, host, host).Scan(&room)
	if err != nil {
		return 0, fmt.Errorf("host %s: %w", host, notFound(err))
	}
	return room, nil
}

// scanVTPM reads a row of vtpmColumns, and after them more columns into
// more.
func scanVTPM(row interface{ Scan(...any) error }, more ...any) (*VTPM, error) {
	var v VTPM
	var keys, eks, resize, created, updated string
	var host sql.NullString
	var connected int
	err := row.Scan(append([]any{&v.InstanceID, &v.Project, &v.Spec.Version, &v.Spec.Model, &v.Spec.SecretSecurity, &v.Spec.Hypervisor,
		&keys, &host, &v.Desired, &v.Phase, &v.Reason, &v.SecretID, &eks, &v.Domain, &v.Sockets.Data, &v.Sockets.Ctrl, &v.PID, &connected, &resize, &v.Generation, &v.Incarnation, &v.Revision, &created, &updated}, more...)...)
	if err != nil {
		return nil, err
	}
	v.Host, v.Connected = host.String, connected != 0
	if err := json.Unmarshal([]byte(keys), &v.Spec.Keys); err != nil {
		return nil, fmt.Errorf("decoding keys of %s: %w", v.InstanceID, err)
	}
	if err := json.Unmarshal([]byte(eks), &v.EKs); err != nil {
		return nil, fmt.Errorf("decoding EKs of %s: %w", v.InstanceID, err)
	}
	if resize != "" {
		if err := json.Unmarshal([]byte(resize), &v.Resize); err != nil {
			return nil, fmt.Errorf("decoding the resize of %s: %w", v.InstanceID, err)
		}
	}
	v.CreatedAt, v.UpdatedAt = parseStamp(created), parseStamp(updated)
	return &v, nil
}

// hostColumn is host as the vtpms table holds it: NULL for none (a
// shelved vTPM's).
func hostColumn(host string) any {
	if host == "" {
		return nil
	}
	return host
}

// encodeLists encodes v's columns that hold JSON; resize is "" for none.
func encodeLists(v *VTPM) (keys, eks, resize string, err error) {
	k, err := json.Marshal(v.Spec.Keys)
	if err != nil {
		return "", "", "", err
	}
	e, err := json.Marshal(v.EKs)
	if err != nil || v.Resize == nil {
		return string(k), string(e), "", err
	}
	r, err := json.Marshal(v.Resize)
	return string(k), string(e), string(r), err
}

// Timestamps are stored as RFC 3339 text with nanoseconds, in UTC, so they
// sort and read the same in SQLite and PostgreSQL.
func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

func parseStamp(s string) time.Time {
	t, _ := time.Parse(time.RFC3339Nano, s)
	return t
}
