package api

import "time"

// CreateVTPMRequest asks for a vTPM for an instance. The flavor and image
// are resolved with the same rules as POST /v1/resolve.
type CreateVTPMRequest struct {
	InstanceID string `json:"instance_id"`
	// Project owns the instance; a caller scoped to a project may omit it.
	Project string `json:"project,omitempty"`
	ResolveRequest
}

// VTPM is a vTPM record as the API shows it.
type VTPM struct {
	InstanceID string   `json:"instance_id"`
	Project    string   `json:"project"`
	Spec       VTPMSpec `json:"spec"`
	Host       string   `json:"host"`
	// Desired is what was asked: running, stopped or deleted.
	Desired string `json:"desired"`
	// Phase is what the host agent observed: pending, provisioning,
	// active, stopped, deleting or error; or where a move the server makes
	// is: shelving, shelved (on no host: Host is ""), unshelving.
	Phase  string `json:"phase"`
	Reason string `json:"reason,omitempty"`
	// SecretRef is the key-manager secret that encrypts the state (a
	// reference, never the secret).
	SecretRef string `json:"secret_ref"`
	// Sockets are where a TPM client or QEMU attaches, as the host's agent
	// last recorded them: while the vTPM is active, on a backend that
	// serves it on sockets; absent once it is stopped, failed or being
	// deleted.
	Sockets *Sockets `json:"sockets,omitempty"`
	// SwtpmPID is the swtpm process serving the vTPM on its host, as the
	// host's agent last recorded it; absent while none runs, and where
	// vtpmd does not run it (libvirt's emulator mode, Xen, Hyper-V).
	SwtpmPID int `json:"swtpm_pid,omitempty"`
	// GuestConnected says a client (a guest's QEMU) held the vTPM's
	// control channel when the host's agent last looked (every few
	// seconds); always false where vtpmd does not run the swtpm.
	GuestConnected bool `json:"guest_connected,omitempty"`
	// Domain is the libvirt domain the vTPM is attached to, if any.
	Domain string `json:"domain,omitempty"`
	// Resize is the vTPM's resize awaiting confirm or revert, if any.
	Resize *Resize `json:"resize,omitempty"`
	// Incarnation names this vTPM of the instance id: each vTPM an
	// instance id is given has a new one, and its events carry it.
	Incarnation string    `json:"incarnation,omitempty"`
	CreatedAt   time.Time `json:"created_at"`
	UpdatedAt   time.Time `json:"updated_at"`
}

// Sockets are a vTPM's unix sockets: TPM commands on Data (tpm2-tss's
// swtpm TCTI with path=Data), swtpm's control channel on Ctrl (QEMU).
type Sockets struct {
	Data string `json:"data"`
	Ctrl string `json:"ctrl"`
}

// VTPMList is one page of vTPMs; Next, when set, is the cursor of the next page.
type VTPMList struct {
	Items []VTPM `json:"items"`
	Next  string `json:"next,omitempty"`
}

// Identity is what a tenant needs to trust a vTPM: its endorsement keys,
// their certificates and the CA chain that issued them (like GCP's
// getShieldedInstanceIdentity).
type Identity struct {
	InstanceID string `json:"instance_id"`
	EKs        []EK   `json:"endorsement_keys"`
	CAChainPEM string `json:"ca_chain_pem"`
}

// EK is one endorsement key.
type EK struct {
	Kind           string `json:"kind"`
	Handle         string `json:"handle"`
	NVIndex        string `json:"nv_index,omitempty"`
	PublicKeyPEM   string `json:"public_key_pem"`
	CertificatePEM string `json:"certificate_pem,omitempty"`
}

// Host is a hypervisor host: its traits and capacity, and its agent's
// heartbeats.
type Host struct {
	Name    string `json:"name"`
	Backend string `json:"backend"`
	// State is up, down (its agent's heartbeats stopped for longer than
	// the server's window) or draining (the operator's: no new vTPMs).
	// Only an up host takes new vTPMs; a down one keeps its vTPMs.
	State string `json:"state"`
	// Draining is set from a drain until an undrain, also while the host
	// reads down.
	Draining bool     `json:"draining"`
	Traits   []string `json:"traits"`
	Capacity int      `json:"capacity"`
	Used     int      `json:"used"`
	// LastHeartbeat is when the host's agent was last heard from (a
	// heartbeat or its registration); left out for a host added by the
	// operator whose agent never spoke.
	LastHeartbeat time.Time `json:"last_heartbeat,omitzero"`
	// Version is the vtpmd build the agent runs, as it last said.
	Version string `json:"version"`
	// Certificates is how many host certificates of the host are valid:
	// neither expired nor revoked.
	Certificates int `json:"certificates"`
}

// HostList is every host.
type HostList struct {
	Items []Host `json:"items"`
}

// Event is one entry of a vTPM's audit log.
type Event struct {
	At     time.Time `json:"at"`
	Actor  string    `json:"actor"`
	Action string    `json:"action"`
	Detail string    `json:"detail,omitempty"`
	// Incarnation is the vTPM of the instance id the event belongs to (see
	// VTPM.Incarnation); "" for a host's, and for events recorded before
	// vtpmd kept incarnations that belong to no vTPM it still has.
	Incarnation string `json:"incarnation,omitempty"`
}

// EventList is a vTPM's audit log, oldest first.
type EventList struct {
	Items []Event `json:"items"`
}

// AttachRequest attaches a vTPM to a libvirt domain on its host.
type AttachRequest struct {
	Domain string `json:"domain"`
}

// AdoptRequest asks vtpmd to take over the vTPM Nova made for an
// instance (POST /v1/vtpms/{id}/adopt): libvirt's emulator TPM of a domain,
// its state where libvirt keeps it, its key in the key manager. Nothing of
// it is rewritten.
type AdoptRequest struct {
	// Domain is the libvirt domain's name (Nova's instance-XXXXXXXX).
	Domain string `json:"domain"`
	// Host is the host whose agent has the domain; "" asks every libvirt
	// host that is up.
	Host string `json:"host,omitempty"`
	// SecretRef is the key-manager secret whose passphrase keys the state
	// (Nova's vtpm_secret_uuid); "" takes the domain's <encryption
	// secret=…>, which must then agree.
	SecretRef string `json:"secret_ref,omitempty"`
	// Project owns the instance; "" takes the secret's project (Nova keeps
	// a user-mode secret in the instance's project).
	Project string `json:"project,omitempty"`
}

// Finding is a piece of drift between a host's hypervisor and vtpmd's
// records: an object with no vTPM record, or a record whose objects are gone.
type Finding struct {
	// Kind: orphan_secret (a libvirt vTPM secret with no record),
	// orphan_state (a TPM state directory with no record), missing_domain
	// (a record attached to a domain that no longer exists), missing_state
	// (a manufactured record whose state is gone); on Xen hosts
	// orphan_stub_domain, orphan_uuid (registered with the VTPM manager,
	// used by no stub domain) and missing_stub_domain.
	Kind string `json:"kind"`
	// Object names what was found: a secret UUID, a path, a domain.
	Object     string `json:"object"`
	InstanceID string `json:"instance_id,omitempty"`
	Detail     string `json:"detail"`
	// Deleted is set when a repair removed the object.
	Deleted bool `json:"deleted,omitempty"`
}

// Drift is what a host's agent found.
type Drift struct {
	Host     string    `json:"host"`
	Findings []Finding `json:"findings"`
}

// ResizeRequest resizes an instance's vTPM to a new flavor and image (POST
// /v1/vtpms/{id}/resize), resolved with the same rules as POST
// /v1/resolve. The vTPM stays on its host.
type ResizeRequest struct {
	// Project owns the instance: only for an instance without a vTPM yet,
	// and a caller scoped to a project may omit it.
	Project string `json:"project,omitempty"`
	// Host is the host the instance runs on, for an instance without a
	// vTPM yet, which gets its first one there; "" places it as a create
	// does.
	Host string `json:"host,omitempty"`
	ResolveRequest
}

// Resize is a vTPM's resize awaiting confirm or revert.
type Resize struct {
	// Status is resized (awaiting confirm or revert), confirming or
	// reverting (the host's agent is removing the old TPM, or the new).
	Status string `json:"status"`
	// Kind is what the resize does: keep (the state is kept), new_tpm (a
	// new TPM; the old one is kept until confirm), add (no vTPM before;
	// revert deletes it), remove (none after; confirm deletes it).
	Kind string `json:"kind"`
	// From is the vTPM before the resize; absent when there was none.
	From *VTPMSpec `json:"from,omitempty"`
	// To is the vTPM after it; absent when the new flavor asks for none.
	To *VTPMSpec `json:"to,omitempty"`
	// OldSecretRef is the key-manager secret of the old TPM (kind
	// new_tpm), kept until confirm.
	OldSecretRef string    `json:"old_secret_ref,omitempty"`
	RequestedAt  time.Time `json:"requested_at"`
}
