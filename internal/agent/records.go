package agent

import (
	"context"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// Records is the control plane as the agent sees it: where it registers
// its host, watches the vTPMs placed on it, records what it did to them and
// reads the secrets that key their state. It is all the agent knows of the
// control plane: agentstore implements it over the store and key manager,
// in their process (vtpmd all-in-one, and the server's side of the agent
// protocol); agentclient implements it over that protocol (vtpmd agent).
type Records interface {
	// RegisterHost records h, with what it offers, and a heartbeat now.
	RegisterHost(ctx context.Context, h Host) error
	// Heartbeat records that hb's host's agent is alive now; ErrNotFound
	// if the host was never registered. A host whose heartbeats stop
	// reads down, and takes no new vTPMs.
	Heartbeat(ctx context.Context, hb Heartbeat) error
	// Watch returns what changed among the vTPMs placed on host after
	// revision since (everything, as a Reset, for since 0), waiting up to
	// wait for a change when there is none yet.
	Watch(ctx context.Context, host string, since int64, wait time.Duration) (*Changes, error)
	// Get reads instanceID's record; ErrNotFound if it has none.
	Get(ctx context.Context, instanceID string) (*Record, error)
	// Update records, with ev, what the agent of r.Host observed of r
	// (Phase, Reason, EKs, Sockets, PID, Connected: nothing else of r is
	// taken) if no one changed the record since r was read, and advances
	// r.Generation (and sets r.SecretID). ErrConflict if someone did;
	// ErrNotFound if r's vTPM is gone (deleted, or replaced by a new vTPM
	// of the instance id); refused if it is placed on another host.
	Update(ctx context.Context, r *Record, ev Event) error
	// Delete removes r's record (which must be desired deleted) with its
	// attestation and secret, with ev as the vTPM's last event;
	// ErrNotFound if it has no record.
	Delete(ctx context.Context, r *Record, ev Event) error
	// Secret reads the payload of the key-manager secret that keys r's
	// state, for r.Host's agent, and sets r.SecretID.
	Secret(ctx context.Context, r *Record) ([]byte, error)
	// Rekey makes secret the key of r's state, which must not be
	// manufactured yet: it is stored for r's project, r points at it
	// (r.SecretID and r.Generation advance) and the secret r had is
	// shredded. The agent rekeys a vTPM that takes a TPM from its pool.
	Rekey(ctx context.Context, r *Record, secret []byte, ev Event) error
	// ReportDrift answers the operator's drift request asked (Changes.Drift)
	// with what differs between host and its records.
	ReportDrift(ctx context.Context, host string, asked int64, findings []api.Finding) error
	// AdoptionSecret reads, for host's agent answering adoption request
	// ask, the payload of key-manager secret secretID: the one the
	// request names, or (when it names none) the one the domain names.
	// A refusal with api.CodeSecretNotFound if the key manager has no such
	// secret, api.CodeAlreadyManaged if it keys a vTPM vtpmd manages.
	AdoptionSecret(ctx context.Context, host string, ask AdoptionAsk, secretID string) ([]byte, error)
	// AnswerAdoption answers host's adoption request ask.
	AnswerAdoption(ctx context.Context, host string, ask AdoptionAsk, answer Adoption) error
	// TransferInput reads what host's agent needs to answer transfer
	// request ask while it waits: the payload of the secret that keys the
	// vTPM's state (released for the transfer, the vTPM running or not)
	// and, for an import, the bundle; ErrNotFound if it is withdrawn.
	TransferInput(ctx context.Context, host string, ask TransferAsk) (*TransferInput, error)
	// TakeTransfer records that the agent's run (Host.Run, as it
	// registered) carries out host's transfer request ask apart from its
	// watch: Watch no longer returns it to that run, but does to the next
	// one, so a request a run took and never answered (the agent died) is
	// carried out again. Taking it again changes nothing. ErrNotFound if
	// the request is answered or withdrawn.
	TakeTransfer(ctx context.Context, host string, ask TransferAsk) error
	// AnswerTransfer answers host's transfer request ask; ErrNotFound if
	// it is withdrawn (its server gave up).
	AnswerTransfer(ctx context.Context, host string, ask TransferAsk, answer Transfer) error
	// Resized records, with ev, that r's agent finished the step of a
	// confirmed or reverted resize (r.Resize ResizeDiscard or
	// ResizeRestore): the resize ends, r.Resize is cleared and
	// r.Generation advances. ErrConflict if the record changed since r was
	// read; ErrNotFound if r's vTPM is gone.
	Resized(ctx context.Context, r *Record, ev Event) error
}

// Changes is what changed on a host after a revision (Records.Watch).
type Changes struct {
	// Revision is the watch token now (the host's revision, and on
	// PostgreSQL the database's timeline): the next watch's since.
	Revision int64
	// Records are the host's records written since, or all of them when
	// Reset.
	Records []*Record
	// Gone are the vTPMs that left the host since; none when Reset.
	Gone []Gone
	// Reset says Records is the whole set: whatever else the watcher
	// holds is gone.
	Reset bool
	// Drift is the operator's request for the host's drift not yet
	// answered; zero for none.
	Drift DriftAsk
	// Adoptions are the operator's requests to take over a vTPM vtpmd
	// did not make, not yet answered.
	Adoptions []AdoptionAsk
	// Transfers are the control plane's requests to export or import a
	// vTPM's state bundle, not yet answered, and not taken by this run of
	// the agent (Records.TakeTransfer).
	Transfers []TransferAsk
}

// TransferAsk asks a host's agent to export the state of the vTPM
// InstanceID, Incarnation as a sealed bundle (package bundle) of
// Generation, to import the bundle Records.TransferInput reads (over the
// state it holds, or as a vTPM arriving), or to discard the state of a
// vTPM leaving the host.
type TransferAsk struct {
	ID          string
	InstanceID  string
	Incarnation string
	Kind        TransferKind
	Generation  int64
}

// TransferKind is what a TransferAsk asks.
type TransferKind string

// The kinds of transfer.
const (
	TransferExport TransferKind = "export"
	TransferImport TransferKind = "import"
	// TransferReceive imports the bundle of a vTPM arriving on the host
	// (migrating to it, or being unshelved onto it): one whose state it
	// does not hold yet.
	TransferReceive TransferKind = "receive"
	// TransferDiscard removes the host's state of a vTPM leaving it (one
	// that migrated away, or one being shelved, whose bundle the server
	// keeps).
	TransferDiscard TransferKind = "discard"
	// The steps of a live migration (LiveMigrator): on the target, prepare
	// (answered with the Incoming, as JSON in Transfer.Bundle), settle and
	// abort; on the source, send (the Incoming in TransferInput.Bundle),
	// and cancel, which the send reads (TransferInput.Cancel) and which is
	// itself answered with nothing.
	TransferPrepare TransferKind = "prepare"
	TransferSend    TransferKind = "send"
	TransferSettle  TransferKind = "settle"
	TransferAbort   TransferKind = "abort"
	TransferCancel  TransferKind = "cancel"
)

// TransferInput is what an agent answers a TransferAsk with.
type TransferInput struct {
	// Secret keys the vTPM's state; nil for a discard.
	Secret []byte
	// Bundle is the bundle to import or receive, or the Incoming (JSON)
	// to send to; nil otherwise.
	Bundle []byte
	// Record is the vTPM's record, for a receive, a discard or a step of a
	// live migration: a vTPM arriving on the host or leaving it, which its
	// agent does not reconcile meanwhile.
	Record *Record
	// Cancel says, for a send, that the server asks the source to stop
	// it (the target went down): libvirt's migration is aborted, and the
	// guest runs on here unless it had landed.
	Cancel bool
}

// Transfer is the agent's answer to a TransferAsk: the bundle exported
// (nil for an import done), or Refusal, why not.
type Transfer struct {
	Bundle  []byte
	Refusal *refusal.Error
}

// transferRefusals are the refusals an agent answers a transfer with, and
// what kind each is.
var transferRefusals = map[api.Code]refusal.Kind{
	api.CodeNotFound:       refusal.KindNotFound,
	api.CodeNotSupported:   refusal.KindConflict,
	api.CodeBundleCorrupt:  refusal.KindConflict,
	api.CodeBundleMismatch: refusal.KindConflict,
	api.CodeVTPMNotStopped: refusal.KindConflict,
	api.CodeTransferFailed: refusal.KindUnavailable,
	api.CodeGuestRunsHere:  refusal.KindConflict,
	api.CodeGuestArriving:  refusal.KindConflict,
}

// ValidTransferRefusal says whether code is one an agent answers a
// transfer with.
func ValidTransferRefusal(code api.Code) bool { _, ok := transferRefusals[code]; return ok }

// TransferFromAPI is an answer in the agent protocol's words as the agent
// gave it.
func TransferFromAPI(a api.AgentTransfer) Transfer {
	if a.Code != "" {
		return Transfer{Refusal: &refusal.Error{Kind: transferRefusals[a.Code], Code: a.Code, Message: a.Message}}
	}
	return Transfer{Bundle: a.Bundle}
}

// API is t in the agent protocol's words.
func (t Transfer) API() api.AgentTransfer {
	if t.Refusal != nil {
		return api.AgentTransfer{Code: t.Refusal.Code, Message: t.Refusal.Message}
	}
	return api.AgentTransfer{Bundle: t.Bundle}
}

// AdoptionAsk asks a host's agent to find the vTPM of libvirt domain
// Domain and identify it as InstanceID's (Adopter), keyed by SecretID, or
// by the secret the domain names when SecretID is "".
type AdoptionAsk struct {
	ID         string
	InstanceID string
	Domain     string
	SecretID   string
}

// Adoption is the agent's answer to an AdoptionAsk: the vTPM it found, or
// Refusal, why it cannot be taken over.
type Adoption struct {
	Spec     spec.Spec
	SecretID string
	// Running says the guest runs.
	Running bool
	EKs     []EK
	// Refusal, when set, is why not: the vTPM found is not to be taken.
	Refusal *refusal.Error
}

// AdoptionFromAPI is an answer in the agent protocol's words as the agent
// gave it.
func AdoptionFromAPI(a api.AgentAdoption) Adoption {
	if a.Code != "" {
		return Adoption{Refusal: &refusal.Error{Kind: adoptionRefusals[a.Code], Code: a.Code, Message: a.Message}}
	}
	out := Adoption{Spec: spec.FromAPI(a.Spec), SecretID: a.SecretRef, Running: a.Running}
	for _, ek := range a.EKs {
		out.EKs = append(out.EKs, EK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: ek.Public, CertDER: ek.Certificate})
	}
	return out
}

// adoptionRefusals are the refusals an agent answers an adoption with, and
// what kind each is.
var adoptionRefusals = map[api.Code]refusal.Kind{
	api.CodeDomainNotFound:    refusal.KindNotFound,
	api.CodeNoVTPM:            refusal.KindConflict,
	api.CodeVTPMStateNotFound: refusal.KindConflict,
	api.CodeAlreadyManaged:    refusal.KindConflict,
	api.CodeSecretNotFound:    refusal.KindNotFound,
	api.CodeWrongSecret:       refusal.KindConflict,
	api.CodeSecretNeedsOwner:  refusal.KindForbidden,
	api.CodeNotSupported:      refusal.KindConflict,
	api.CodeAdoptionFailed:    refusal.KindUnavailable,
}

// ValidAdoptionRefusal says whether code is one an agent answers an
// adoption with.
func ValidAdoptionRefusal(code api.Code) bool { _, ok := adoptionRefusals[code]; return ok }

// API is a in the agent protocol's words.
func (a Adoption) API() api.AgentAdoption {
	if a.Refusal != nil {
		return api.AgentAdoption{Code: a.Refusal.Code, Message: a.Refusal.Message}
	}
	out := api.AgentAdoption{Spec: spec.APISpec(a.Spec), SecretRef: a.SecretID, Running: a.Running}
	for _, ek := range a.EKs {
		out.EKs = append(out.EKs, api.AgentEK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, Public: ek.PublicDER, Certificate: ek.CertDER})
	}
	return out
}

// DriftAsk is an operator's request for what differs between a host and
// its records: the ID to answer, and whether to delete orphans.
type DriftAsk struct {
	ID     int64
	Repair bool
}

// Gone is a vTPM that left a host.
type Gone struct {
	InstanceID  string
	Incarnation string
}

// Host is what the agent registers of its host.
type Host struct {
	Name     string
	Traits   []string // spec.HostTraits of the backend's capabilities
	Capacity int      // how many vTPMs it may hold
	Backend  string   // Backend.Name
	Version  string   // the vtpmd build the agent runs
	// Run names this run of the agent (one start of its process), random:
	// the transfers it takes (Records.TakeTransfer) are handed again to
	// the next.
	Run string
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
	// PID is the swtpm process serving the vTPM, as the agent last found
	// it (Server.PID); 0 while it does not run or where vtpmd does not run
	// it.
	PID int
	// Connected says a client (a guest's QEMU) held the vTPM's control
	// channel when the agent last looked (Server.Connected).
	Connected bool
	// Resize is what a pending resize asks of the host; "" for nothing.
	Resize ResizeStep
	// Generation increases with every change; Update refuses a stale one.
	Generation int64
}

// ResizeStep is what a resize that gives a vTPM a new TPM (another version
// or model) asks of its host's agent; the other resizes ask nothing of it.
type ResizeStep string

// The resize steps, each done through the backend's Resizer.
const (
	// ResizeSetAside: the resize is pending. The old TPM's state is kept
	// aside, served by nothing, and a new TPM is made (Ensure) with the
	// record's new secret.
	ResizeSetAside ResizeStep = "set_aside"
	// ResizeDiscard: the resize is confirmed. The old TPM's state goes;
	// then the agent says so (Records.Resized).
	ResizeDiscard ResizeStep = "discard"
	// ResizeRestore: the resize is reverted. The new TPM's state goes and
	// the old one's is put back; then the agent says so
	// (Records.Resized), and runs the old TPM as before.
	ResizeRestore ResizeStep = "restore"
)

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
// error with a reason. The control plane sets those of a move, shelving
// and unshelving, and the agent leaves such a vTPM alone but for a delete
// and the transfers asked of it.
const (
	PhasePending      Phase = "pending"
	PhaseProvisioning Phase = "provisioning"
	PhaseActive       Phase = "active"
	PhaseStopped      Phase = "stopped"
	PhaseDeleting     Phase = "deleting"
	PhaseError        Phase = "error"
	PhaseShelving     Phase = "shelving"
	PhaseUnshelving   Phase = "unshelving"
)
