package api

import "time"

// JoinToken is a one-time join token for a host (POST
// /v1/hosts/{name}/join-tokens): its agent exchanges it for a host
// certificate (POST /v1/agent/enroll). Shown once; the server keeps only
// its hash.
type JoinToken struct {
	Host      string    `json:"host"`
	Token     string    `json:"token"`
	ExpiresAt time.Time `json:"expires_at"`
}

// EnrollRequest is a host agent's enrolment: the operator's join token
// and a PKCS#10 certificate request (DER; base64 in JSON) for a key the
// agent made and keeps.
type EnrollRequest struct {
	JoinToken string `json:"join_token"`
	CSR       []byte `json:"csr"`
}

// RenewRequest asks for the calling host's next client certificate (POST
// /v1/agent/renew, with its current one): a PKCS#10 request (DER; base64
// in JSON) for a new key the agent made and keeps.
type RenewRequest struct {
	CSR []byte `json:"csr"`
}

// Enrollment is the host's client certificate, for every later call of
// its agent (mTLS).
type Enrollment struct {
	Host string `json:"host"`
	// Certificate is the host's client certificate, DER (base64 in JSON).
	Certificate []byte    `json:"certificate"`
	NotAfter    time.Time `json:"not_after"`
	// CAChain is the host CA's chain, PEM.
	CAChain string `json:"ca_chain"`
	// TPMBound says the host's registered TPM vouched for the enrolment
	// (its agent token came with the request).
	TPMBound bool `json:"tpm_bound,omitempty"`
}

// HeartbeatRequest is a host agent's heartbeat; the host is the one its
// client certificate names.
type HeartbeatRequest struct {
	// Version is the vtpmd build the agent runs.
	Version string `json:"version"`
}

// HostRevocation is what revoking a host (POST /v1/hosts/{name}/revoke)
// stopped.
type HostRevocation struct {
	Host string `json:"host"`
	// Certificates is how many of its host certificates were revoked.
	Certificates int `json:"certificates"`
	// JoinTokens is how many of its unused join tokens were deleted.
	JoinTokens int `json:"join_tokens"`
}

// AgentHost is what a host's agent registers (PUT /v1/agent/host): what
// its backend offers. The host is the one its client certificate names.
type AgentHost struct {
	Traits   []string `json:"traits"`
	Capacity int      `json:"capacity"`
	Backend  string   `json:"backend"`
	Version  string   `json:"version"`
	// Run names this run of the agent (one start of its process): a
	// transfer request it takes (POST /v1/agent/transfers/{id}/take) is
	// no longer carried by its watch, until another run registers. At most
	// 64 bytes; absent, the agent takes none.
	Run string `json:"run,omitempty"`
}

// AgentVTPM is a vTPM as its host's agent sees it: what was asked of it
// and what the agent last recorded.
type AgentVTPM struct {
	InstanceID  string    `json:"instance_id"`
	Incarnation string    `json:"incarnation"`
	Project     string    `json:"project"`
	Spec        VTPMSpec  `json:"spec"`
	Host        string    `json:"host"`
	Domain      string    `json:"domain,omitempty"`
	Desired     string    `json:"desired"`
	Phase       string    `json:"phase"`
	Reason      string    `json:"reason,omitempty"`
	SecretRef   string    `json:"secret_ref"`
	EKs         []AgentEK `json:"eks"`
	Sockets     *Sockets  `json:"sockets,omitempty"`
	// SwtpmPID is the swtpm process serving it, as the agent last
	// reported; absent when none runs or vtpmd does not run it.
	SwtpmPID int `json:"swtpm_pid,omitempty"`
	// GuestConnected says a client held its control channel.
	GuestConnected bool `json:"guest_connected,omitempty"`
	// Resize is what a resize to a new TPM asks of the agent: set_aside
	// (keep the old TPM's state aside and make a new TPM), discard
	// (confirmed: remove the old state, then POST .../resized) or restore
	// (reverted: put the old state back in place of the new, then POST
	// .../resized); absent for nothing.
	Resize string `json:"resize,omitempty"`
	// Generation increases with every change; a report on an older one is
	// refused (409).
	Generation int64 `json:"generation"`
}

// AgentEK is an endorsement key as an agent reports it.
type AgentEK struct {
	Kind    string `json:"kind"`
	Handle  uint32 `json:"handle"`
	NVIndex uint32 `json:"nv_index,omitempty"`
	// Public is the PKIX public key, DER (base64 in JSON).
	Public []byte `json:"public"`
	// Certificate is its EK certificate, DER; absent when not certified.
	Certificate []byte `json:"certificate,omitempty"`
}

// AgentChanges answers an agent's watch (GET /v1/agent/vtpms?since=N):
// what changed among its host's vTPMs after revision N.
type AgentChanges struct {
	// Revision is the watch token now (opaque: the host's revision and the
	// database's timeline): the next watch's since.
	Revision int64       `json:"revision"`
	VTPMs    []AgentVTPM `json:"vtpms"`
	// Gone are the vTPMs that left the host since; none when Reset.
	Gone []AgentGone `json:"gone"`
	// Reset says VTPMs is the whole set (since was 0, or too old): the
	// agent drops whatever else it holds.
	Reset bool `json:"reset"`
	// Drift is the operator's drift request the agent is to answer (PUT
	// /v1/agent/drift); absent when none waits.
	Drift *AgentDriftAsk `json:"drift,omitempty"`
	// Adoptions are the operator's requests to look at a libvirt domain
	// whose vTPM vtpmd is to take over, each to be answered (PUT
	// /v1/agent/adoptions/{id}); absent when none waits.
	Adoptions []AgentAdoptionAsk `json:"adoptions,omitempty"`
	// Transfers are the server's requests to export a vTPM's state bundle
	// or import one (GET /v1/agent/transfers/{id} for the secret and bundle), each to be
	// answered (PUT /v1/agent/transfers/{id}); absent when none waits. A
	// request the agent's run took (POST /v1/agent/transfers/{id}/take)
	// is not among them, so its watch goes on while it carries it out.
	Transfers []AgentTransferAsk `json:"transfers,omitempty"`
}

// AgentTransferAsk asks a host's agent to export the state of a vTPM
// placed on it as a sealed state bundle of Generation (Kind "export"), to
// import one over its state (Kind "import"), to take in the bundle of a
// vTPM arriving on it, migrating or unshelved (Kind "receive"), or to
// remove the state of a vTPM leaving it, migrated away or shelved (Kind
// "discard").
type AgentTransferAsk struct {
	ID          string `json:"id"`
	InstanceID  string `json:"instance_id"`
	Incarnation string `json:"incarnation"`
	Kind        string `json:"kind"`
	Generation  int64  `json:"generation"`
}

// AgentTransferInput is what a host's agent needs to answer a transfer
// request (GET /v1/agent/transfers/{id}): the payload of the secret that
// keys the vTPM's state (none for a discard), for an import or a receive
// the bundle, and for a receive or a discard the vTPM's record, which the
// host does not hold. For a live migration's send, Cancel says the server
// asks the source to stop it (its target went down).
type AgentTransferInput struct {
	Payload []byte     `json:"payload,omitempty"`
	Bundle  []byte     `json:"bundle,omitempty"`
	VTPM    *AgentVTPM `json:"vtpm,omitempty"`
	Cancel  bool       `json:"cancel,omitempty"`
}

// AgentTransfer is an agent's answer to a transfer request (PUT
// /v1/agent/transfers/{id}): the bundle exported, nothing for an import
// done, or why not (Code, Message).
type AgentTransfer struct {
	Bundle  []byte `json:"bundle,omitempty"`
	Code    Code   `json:"code,omitempty"`
	Message string `json:"message,omitempty"`
}

// AgentAdoptionAsk asks a host's agent to find domain's vTPM, open its
// state with its secret (GET /v1/agent/adoptions/{id}/secret) and read its
// endorsement keys, for the vTPM of InstanceID.
type AgentAdoptionAsk struct {
	ID         string `json:"id"`
	InstanceID string `json:"instance_id"`
	Domain     string `json:"domain"`
	// SecretRef is the secret the operator named; "" for the domain's own.
	SecretRef string `json:"secret_ref,omitempty"`
}

// AgentAdoption is an agent's answer to an adoption request: what it found
// (Spec, SecretRef, Running, EKs), or why it cannot (Code, Message).
type AgentAdoption struct {
	Code    Code   `json:"code,omitempty"`
	Message string `json:"message,omitempty"`
	// Spec is the vTPM as the domain's TPM device describes it.
	Spec      VTPMSpec  `json:"spec"`
	SecretRef string    `json:"secret_ref,omitempty"`
	Running   bool      `json:"running"`
	EKs       []AgentEK `json:"eks"`
}

// AgentDriftAsk is an operator's request for what differs between a host
// and its records.
type AgentDriftAsk struct {
	ID int64 `json:"id"`
	// Repair asks for orphans to be deleted.
	Repair bool `json:"repair"`
}

// AgentDriftReport answers drift request Asked (PUT /v1/agent/drift).
type AgentDriftReport struct {
	Asked    int64     `json:"asked"`
	Findings []Finding `json:"findings"`
}

// AgentGone is a vTPM that left a host.
type AgentGone struct {
	InstanceID  string `json:"instance_id"`
	Incarnation string `json:"incarnation"`
}

// AgentEvent is what an agent says it did to a vTPM, for its event log.
type AgentEvent struct {
	Action string `json:"action"`
	Detail string `json:"detail,omitempty"`
}

// AgentReport is an agent's observed state of a vTPM (PUT
// /v1/agent/vtpms/{id}): taken only if the record is still at Generation
// of Incarnation.
type AgentReport struct {
	Incarnation string    `json:"incarnation"`
	Generation  int64     `json:"generation"`
	Phase       string    `json:"phase"`
	Reason      string    `json:"reason,omitempty"`
	EKs         []AgentEK `json:"eks"`
	Sockets     *Sockets  `json:"sockets,omitempty"`
	SwtpmPID    int       `json:"swtpm_pid,omitempty"`
	// GuestConnected says a client (a guest's QEMU) holds its control
	// channel.
	GuestConnected bool       `json:"guest_connected,omitempty"`
	Event          AgentEvent `json:"event"`
}

// AgentDeletion is an agent's word that a vTPM's state is gone (POST
// /v1/agent/vtpms/{id}/deleted): its record, attestation and secret go.
type AgentDeletion struct {
	Incarnation string     `json:"incarnation"`
	Generation  int64      `json:"generation"`
	Event       AgentEvent `json:"event"`
}

// AgentResized is an agent's word that it finished a confirmed or reverted
// resize's step (POST /v1/agent/vtpms/{id}/resized): the resize ends.
type AgentResized struct {
	Incarnation string     `json:"incarnation"`
	Generation  int64      `json:"generation"`
	Event       AgentEvent `json:"event"`
}

// AgentRekey gives a vTPM not yet manufactured a new secret (POST
// /v1/agent/vtpms/{id}/rekey): a TPM from the agent's pool, made with it.
type AgentRekey struct {
	Incarnation string `json:"incarnation"`
	Generation  int64  `json:"generation"`
	// Payload is the secret, base64 in JSON.
	Payload []byte     `json:"payload"`
	Event   AgentEvent `json:"event"`
}

// AgentSecret is the secret that keys a vTPM's state (GET
// /v1/agent/vtpms/{id}/secret), released to the agent of the host it is
// placed on while it is to run.
type AgentSecret struct {
	SecretRef string `json:"secret_ref"`
	// Payload is the secret, base64 in JSON.
	Payload []byte `json:"payload"`
}

// AgentWritten is the record's new generation after an agent's write.
type AgentWritten struct {
	Generation int64  `json:"generation"`
	SecretRef  string `json:"secret_ref"`
}

// EKCertificateRequest asks the deployment CA to certify the EK of a vTPM
// the agent is manufacturing (POST /v1/agent/ek-certificates): one placed
// on its host (InstanceID), or one for its pool ("").
type EKCertificateRequest struct {
	InstanceID string `json:"instance_id,omitempty"`
	TPMVersion string `json:"tpm_version"`
	// Public is the EK's PKIX public key, DER (base64 in JSON).
	Public []byte `json:"public"`
}

// IssuedEKCertificate is the certificate, DER (base64 in JSON).
type IssuedEKCertificate struct {
	Certificate []byte `json:"certificate"`
}
