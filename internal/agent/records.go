package agent

import (
	"context"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// Records is the control plane as the agent sees it: where it registers
// its host, reads the vTPMs placed on it and records what it did to them.
// Apart from the key manager, it is all the agent knows of the control
// plane. agentstore implements it over the store, for an agent in the
// store's process.
type Records interface {
	// RegisterHost records h, with what it offers, and a heartbeat now.
	RegisterHost(ctx context.Context, h Host) error
	// Heartbeat records that hb's host's agent is alive now; ErrNotFound
	// if the host was never registered. A host whose heartbeats stop
	// reads down, and takes no new vTPMs.
	Heartbeat(ctx context.Context, hb Heartbeat) error
	// List returns the records of the vTPMs placed on host, by instance id.
	List(ctx context.Context, host string) ([]*Record, error)
	// Get reads instanceID's record; ErrNotFound if it has none.
	Get(ctx context.Context, instanceID string) (*Record, error)
	// Update records, with ev, what the agent changed in r (Phase,
	// Reason, EKs, Sockets, SecretID: the fields an agent changes) if no one
	// changed the record since r was read, and advances r.Generation.
	// ErrConflict if someone did; ErrNotFound if r's vTPM is gone
	// (deleted, or replaced by a new vTPM of the instance id).
	Update(ctx context.Context, r *Record, ev Event) error
	// Delete removes instanceID's record and its attestation, with ev as
	// the vTPM's last event; ErrNotFound if it has no record.
	Delete(ctx context.Context, instanceID string, ev Event) error
}

// Host is what the agent registers of its host.
type Host struct {
	Name     string
	Traits   []string // spec.HostTraits of the backend's capabilities
	Capacity int      // how many vTPMs it may hold
	Backend  string   // Backend.Name
	Version  string   // the vtpmd build the agent runs
}

// Heartbeat says that the agent of Host, running vtpmd Version, is alive.
type Heartbeat struct {
	Host    string
	Version string
}

// Record is one vTPM as the control plane holds it: what was asked of it,
// and what its host's agent last recorded.
type Record struct {
	InstanceID  string
	Incarnation string
	Project     string
	Spec        spec.Spec
	Host        string
	Domain      string // the libvirt domain it is attached to; "" for none
	Desired     Desired
	Phase       Phase
	Reason      string // why Phase is error
	SecretID    string // key-manager secret that keys the state
	EKs         []EK
	// Sockets are where the agent last found the vTPM served
	// (Backend.Sockets): recorded when it becomes active, cleared when it
	// stops, fails or is being deleted.
	Sockets api.Sockets
	// Generation increases with every change; Update refuses a stale one.
	Generation int64
}

// VTPM is what a backend is asked to act on for r.
func (r *Record) VTPM() VTPM {
	return VTPM{InstanceID: r.InstanceID, Incarnation: r.Incarnation, Spec: r.Spec, SecretID: r.SecretID, Domain: r.Domain,
		Desired: r.Desired, Manufactured: len(r.EKs) > 0, Active: r.Phase == PhaseActive}
}

// Event is what the agent says it did to a vTPM, for the vTPM's log.
type Event struct {
	Actor  string // "agent:<host>"
	Action string // provisioning, started, stopped, deleted, error, ...
	Detail string // never secrets
}

// Desired is what was asked of a vTPM.
type Desired string

// The desired states.
const (
	DesiredRunning Desired = "running"
	DesiredStopped Desired = "stopped"
	DesiredDeleted Desired = "deleted"
)

// Phase is what the agent last found a vTPM doing.
type Phase string

// The phases: pending → provisioning → active ⇄ stopped → deleting, or
// error with a reason.
const (
	PhasePending      Phase = "pending"
	PhaseProvisioning Phase = "provisioning"
	PhaseActive       Phase = "active"
	PhaseStopped      Phase = "stopped"
	PhaseDeleting     Phase = "deleting"
	PhaseError        Phase = "error"
)
