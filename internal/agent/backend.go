package agent

import (
	"context"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/bundle"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// Backend runs vTPMs on one host. Every method is idempotent. A backend
// knows a vTPM only through the requests (VTPM) the agent makes of it,
// never through the control plane's records.
type Backend interface {
	// Name says which backend this is (swtpm, libvirt, ...).
	Name() string
	// Capabilities are what the host can serve.
	Capabilities(ctx context.Context) (spec.Capabilities, error)
	// Ensure makes v's vTPM exist and run, manufacturing it on first use
	// with secret as its state key. It returns the vTPM's endorsement keys:
	// none from a backend whose TPM makes its own (a Xen stub domain).
	Ensure(ctx context.Context, v VTPM, secret []byte) ([]EK, error)
	// Stop stops v's vTPM, keeping its state.
	Stop(ctx context.Context, v VTPM) error
	// Destroy stops v's vTPM and removes its state.
	Destroy(ctx context.Context, v VTPM) error
	// Sockets are where clients attach to instanceID's vTPM while it
	// runs, or none where they reach it otherwise; the agent records them
	// with the vTPM's observed state.
	Sockets(instanceID string) api.Sockets
}

// Server is a backend whose vTPMs are swtpm processes vtpmd runs: PID
// names the one serving instanceID's vTPM, 0 for none; Connected says a
// client (a guest's QEMU) holds its control channel. The agent records
// both with the vTPM's observed state, and a change as an event.
type Server interface {
	PID(instanceID string) int
	Connected(instanceID string) bool
}

// Drifter is a backend that can tell what on its host differs from the
// records it is given (orphan state or secrets, vTPMs whose guest is
// gone), deleting the orphans when repair is set.
type Drifter interface {
	Drift(ctx context.Context, records func(context.Context) ([]VTPM, error), repair bool) ([]api.Finding, error)
}

// Adopter is a backend that can take over a vTPM another program made
// (Nova, through libvirt) without rewriting it. Adopt finds the vTPM of
// ask.Domain, reads its key with secret (the payload of the key-manager
// secret of that id: ask.SecretID, or the one the domain names), opens its
// state with it, reads its endorsement keys and records them beside the
// state as if it had made the TPM, so that Ensure, Stop and Destroy treat
// it as one of its own from then on. It answers a vTPM that cannot be
// taken with a refusal in the answer, and errors only for faults.
// Idempotent: asked again, it opens the state again.
type Adopter interface {
	Adopt(ctx context.Context, ask AdoptionAsk, secret func(id string) ([]byte, error)) (Adoption, error)
}

// Resizer is a backend that can give a vTPM a new TPM while keeping its
// old one, for a resize to another TPM version or model: SetAside stops
// the vTPM and moves its state aside, kept and served by nothing, so that
// the next Ensure makes a new TPM; Restore stops the vTPM, removes the new
// TPM's state and puts the old back (v is the old TPM's record again;
// secret reads the payload of its secret, for a backend that must hand it
// to the hypervisor again); Discard removes the state set aside. Each is
// idempotent and safe to re-run after a crash at any point: a state set
// aside is never set aside again over the new TPM (SetAside moves nothing
// once one is aside), and Restore moves nothing when none is. Destroy
// removes a state set aside with the rest.
type Resizer interface {
	SetAside(ctx context.Context, v VTPM) error
	Restore(ctx context.Context, v VTPM, secret func() ([]byte, error)) error
	Discard(ctx context.Context, v VTPM) error
}

// LiveMigrator is a backend that can move a running guest with its vTPM
// to another host of its kind, the TPM state carried in the hypervisor's
// migration stream. On the destination, PrepareIncoming makes ready to
// receive v, whose endorsement keys are eks (with secret as its state key,
// held only as long as v's secret-security mode allows), and says how the
// source reaches it;
// SettleIncoming, once the guest runs there, drops what only the move
// needed; AbortIncoming, after a failed move, removes what was prepared.
// On the source, MigrateLive migrates v's running guest to to and returns
// once it runs there, or fails with the guest still running here; when
// ctx ends first, it stops the migration (the guest runs on here, unless
// it landed meanwhile: then it returns nil). Each is idempotent.
type LiveMigrator interface {
	PrepareIncoming(ctx context.Context, v VTPM, secret []byte, eks []EK) (Incoming, error)
	MigrateLive(ctx context.Context, v VTPM, to Incoming) error
	SettleIncoming(ctx context.Context, v VTPM) error
	AbortIncoming(ctx context.Context, v VTPM) error
}

// Incoming is how the source of a live migration reaches its destination:
// the destination hypervisor's URI for peer-to-peer migration, and, where
// the guest's TPM is vtpmd's own swtpm, the control socket the guest
// connects to there.
type Incoming struct {
	URI     string `json:"uri"`
	TPMCtrl string `json:"tpm_ctrl,omitempty"`
}

// Pool is a backend that keeps manufactured TPMs ready (the swtpm
// backend): Claim hands out one's secret, which the agent makes the
// record's (Records.Rekey) before adopt moves the TPM to the instance;
// discard throws it away. Adopted says the instance's TPM came from the
// pool.
type Pool interface {
	Claim(v spec.Version) (secret []byte, adopt func(ctx context.Context, instanceID string) error, discard func(), ok bool)
	Adopted(instanceID string) bool
}

// VTPM is what the agent asks of a backend: one instance's vTPM as it is
// wanted, with what the backend must know of its past. The secret that
// keys its state is not in it but passed to Ensure alone, so a VTPM may be
// logged and kept.
type VTPM struct {
	InstanceID string
	// Incarnation tells this vTPM from the earlier ones of its instance id.
	Incarnation string
	Spec        spec.Spec
	// SecretID is the key-manager secret whose payload keys the state; the
	// libvirt secret of an emulator-mode vTPM has the same UUID.
	SecretID string
	// Domain is the libvirt domain the vTPM is attached to; "" for none.
	Domain string
	// Desired is what was asked of the vTPM. Ensure, Stop and Destroy
	// each stand for one; Drift reads it (a vTPM being deleted may have
	// lost its state already).
	Desired Desired
	// Manufactured says the vTPM's endorsement keys are on record: its
	// state must exist, and is never made again over.
	Manufactured bool
	// Active says the agent last found the vTPM running: Ensure checks it
	// rather than starting it, so a guest that shut itself down stays off.
	Active bool
}

// EK is an endorsement key of a vTPM, as its backend reports it.
type EK struct {
	Kind      string // swtpm.EKKind: rsa2048, ecc-nist-p256, ...
	Handle    uint32 // persistent handle; 0 for TPM 1.2, whose EK has none
	NVIndex   uint32 // where its certificate is in the TPM's NV; 0 if not
	PublicDER []byte // PKIX
	CertDER   []byte // nil when not certified
}

// Exporter is a backend whose vTPM state can leave its host and come
// back: the files of a state bundle (package bundle), as they are at rest,
// still encrypted with the vTPM's secret.
type Exporter interface {
	// Export returns v's state files: a consistent copy of the state as
	// last written, the vTPM running or not.
	Export(ctx context.Context, v VTPM) ([]bundle.File, error)
	// Import replaces v's state, which must not be running, with files,
	// once they prove to open with secret as the TPM whose endorsement
	// keys are eks (the record's); any failure leaves the state as it
	// was.
	Import(ctx context.Context, v VTPM, secret []byte, files []bundle.File, eks []EK) error
}
