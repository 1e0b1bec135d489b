package api

import "time"

// RegisterRequest starts registering a guest's attestation key (AK).
type RegisterRequest struct {
	// EKKind picks the EK the challenge is encrypted to: rsa2048 or
	// ecc-nist-p256; default: the kind of EKPublic when sent, else rsa2048.
	EKKind string `json:"ek_kind,omitempty"`
	// EKPublic, when given, is the EK the guest reads from its TPM (PKIX
	// DER): it must be the one vtpmd made for the instance.
	EKPublic []byte `json:"ek_public,omitempty"`
	// AKPublic is the AK's TPM2B_PUBLIC.
	AKPublic []byte `json:"ak_public"`
	// EKCertificate (DER) is how a host's TPM, which vtpmd did not make,
	// proves its EK: the certificate must chain to a configured CA
	// (--host-ek-ca) and certify EKPublic.
	EKCertificate []byte `json:"ek_certificate,omitempty"`
}

// CredentialChallenge is TPM2_MakeCredential's output for the guest's
// TPM2_ActivateCredential.
type CredentialChallenge struct {
	// EKHandle is the EK to activate with, when vtpmd knows it (a vTPM it
	// made); otherwise the TPM's own.
	EKHandle       string `json:"ek_handle,omitempty"`
	CredentialBlob []byte `json:"credential_blob"`
	EncryptedSeed  []byte `json:"encrypted_seed"`
	// Ticket is what the registration vouched for, opaque to the agent:
	// vtpmd keeps nothing until the credential comes back with it.
	Ticket []byte `json:"ticket"`
}

// ActivateRequest answers a CredentialChallenge: its ticket and the secret
// the TPM released.
type ActivateRequest struct {
	Ticket []byte `json:"ticket"`
	Secret []byte `json:"secret"`
}

// Nonce is what the next quote must carry as qualifying data.
type Nonce struct {
	Nonce     []byte    `json:"nonce"`
	ExpiresAt time.Time `json:"expires_at"`
}

// EvidenceRequest is one attestation pushed by a guest agent.
type EvidenceRequest struct {
	Nonce     []byte         `json:"nonce"`
	Attest    []byte         `json:"attest"`    // TPMS_ATTEST
	Signature []byte         `json:"signature"` // TPMT_SIGNATURE
	PCRs      map[int][]byte `json:"pcrs"`      // SHA-256 bank
	EventLog  []byte         `json:"event_log"`
	IMALog    []byte         `json:"ima_log,omitempty"` // binary_runtime_measurements, when IMA runs
	// IMAOffset: IMALog continues the verifier's copy of the log from
	// this entry (the ima_entries of its last answer); 0: IMALog is whole.
	IMAOffset int `json:"ima_offset,omitempty"`
}

// Refresh is a request for fresh evidence: the answer to asking for one
// (POST …/attestation/refresh) and to an agent's long poll for one (GET
// …/attestation/refresh?wait=D), where Requested says whether it was asked.
type Refresh struct {
	Requested   bool      `json:"requested"`
	RequestedAt time.Time `json:"requested_at,omitzero"`
	// Revoked names, in an agent's long poll, the secrets revoked from
	// its instance since it was last told (the key broker): the agent
	// runs its revocation action and forgets them.
	Revoked []string `json:"revoked,omitempty"`
}

// PolicyRequest sets an instance's (or a host's) measured-boot policy:
// learned from its last accepted evidence, or a copy of a named policy.
type PolicyRequest struct {
	// Learn takes the last accepted evidence as the reference.
	Learn bool `json:"learn,omitempty"`
	// PCRs are the PCRs a learned policy covers; default: every PCR quoted
	// but 10 (IMA's, which changes as the system runs) for values, and
	// every PCR measured for digests.
	PCRs []int `json:"pcrs,omitempty"`
	// Digests learns the digests each PCR's events carry (and IMA's file
	// digests for PCR 10) instead of the PCRs' values.
	Digests bool `json:"digests,omitempty"`
	// Policy names a policy to apply instead (the caller's project's, else
	// the operator's shared one of that name).
	Policy string `json:"policy,omitempty"`
}

// Policy is a named measured-boot reference: the SHA-256 value (hex) each
// listed PCR must hold. Applying it copies it: deleting or re-creating a
// policy does not change the instances it was applied to.
type Policy struct {
	Name string `json:"name"`
	// Project owns it; "" is the operator's, which every project may apply.
	Project string         `json:"project,omitempty"`
	PCRs    map[int]string `json:"pcrs,omitempty"`
	// Digests lists, per PCR, the digests (hex SHA-256) its events may
	// carry: firmware events', or for PCR 10 IMA's file digests.
	Digests map[int][]string `json:"digests,omitempty"`
	// LearnedFrom is the instance (or "host:NAME") it was learned from.
	LearnedFrom string `json:"learned_from,omitempty"`
	// HasEventLog: the reference boot's event log is kept, so a mismatch
	// names the event that differs.
	HasEventLog bool      `json:"has_event_log"`
	CreatedAt   time.Time `json:"created_at"`
}

// CreatePolicyRequest creates a named policy from reference values, or
// learns one from the last accepted evidence of an instance or host.
type CreatePolicyRequest struct {
	Name string `json:"name"`
	// Project defaults to the caller's; the operator's default is "" (shared).
	Project   string           `json:"project,omitempty"`
	PCRs      map[int]string   `json:"pcrs,omitempty"`
	Digests   map[int][]string `json:"digests,omitempty"`
	LearnFrom *LearnFrom       `json:"learn_from,omitempty"`
}

// LearnFrom names the attestation a policy is learned from: an instance or
// (operator only) a host, and the PCRs to take (default: all quoted).
type LearnFrom struct {
	InstanceID string `json:"instance_id,omitempty"`
	Host       string `json:"host,omitempty"`
	PCRs       []int  `json:"pcrs,omitempty"`
	Digests    bool   `json:"digests,omitempty"` // learn digests, not values
}

// PolicyList is a list of policies.
type PolicyList struct {
	Items []Policy `json:"items"`
}

// Activation answers a completed registration: the status, and the
// bearer token the agent must send (Authorization: Bearer) for nonces,
// evidence and long polls. Only the TPM that opened the credential gets it.
type Activation struct {
	Attestation
	AgentToken string `json:"agent_token"`
}

// Attestation is the attestation status of an instance (its vTPM) or of a
// host (its own TPM).
type Attestation struct {
	InstanceID string `json:"instance_id,omitempty"`
	HostName   string `json:"host_name,omitempty"` // a host's own attestation
	// State: unregistered, challenged (registration waits for the
	// credential) or registered.
	State        string    `json:"state"`
	RegisteredAt time.Time `json:"registered_at,omitzero"`
	// Verdict on the subject's own evidence: pending (no evidence or no
	// policy yet), trusted, untrusted, or stale (no evidence for several
	// rounds).
	Verdict    string    `json:"verdict"`
	Reasons    []string  `json:"reasons,omitempty"`
	VerifiedAt time.Time `json:"verified_at,omitzero"`
	PolicyPCRs []int     `json:"policy_pcrs,omitempty"`
	// Policy names the policy applied, if one was ("" when learned).
	Policy string         `json:"policy,omitempty"`
	PCRs   map[int][]byte `json:"pcrs,omitempty"`
	// IMAEntries is how many entries of this boot's IMA log the verifier
	// holds (the quotes vouched for them): the agent's next evidence
	// continues the log from there (EvidenceRequest.IMAOffset).
	IMAEntries int `json:"ima_entries,omitempty"`

	// For an instance: the verdict on the host it runs on, and the record
	// of how its vTPM was provisioned.
	Host         *HostVerdict  `json:"host,omitempty"`
	Provisioning *Provisioning `json:"provisioning,omitempty"`
	// Overall is the tenant's one answer for an instance: trusted only for
	// a trusted VM, with a vTPM vtpmd provisioned, on a trusted host;
	// otherwise untrusted, pending or stale. Summary says why in words.
	Overall string `json:"overall,omitempty"`
	Summary string `json:"summary,omitempty"`
}

// HostVerdict is a host's attestation as an instance's status carries it.
// Verdict is "unattested" for a host whose TPM never registered.
type HostVerdict struct {
	Name       string    `json:"name"`
	Verdict    string    `json:"verdict"`
	Reasons    []string  `json:"reasons,omitempty"`
	VerifiedAt time.Time `json:"verified_at,omitzero"`
}

// Provisioning says who made a vTPM's identity: its EK certificates, their
// issuer, and whether they chain to the deployment CA; and the host vtpmd
// placed it on.
type Provisioning struct {
	Host           string          `json:"host"`
	EKCertificates []EKCertificate `json:"ek_certificates"`
	// Verified: every EK certificate chains to the deployment CA.
	Verified bool   `json:"verified"`
	Reason   string `json:"reason,omitempty"`
}

// EKCertificate describes one EK certificate.
type EKCertificate struct {
	Kind      string    `json:"kind"`
	Issuer    string    `json:"issuer"`
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"not_before"`
}

// VerdictToken is an attestation verdict signed by the verifier: a JWT
// (ES256) whose claims are iss ("vtpmd"), sub (the instance), iat, exp,
// project, host, verdict, reasons, verified_at, policy_pcrs, overall,
// summary, host_verdict and provisioning_verified. The key, named by the
// header's kid, is at GET /.well-known/vtpmd/jwks.json; docs/attestation.md
// lists what a relying party must check. POSTed to the webhook, the token
// also carries jti: the delivery's id, the same on every attempt, also in
// the X-Vtpmd-Delivery header, so that a receiver drops a repeat.
type VerdictToken struct {
	Token string `json:"token"`
}

// WebhookDeliveryHeader names the delivery a webhook POST attempts: the
// same id on every attempt at it, and the token's jti.
const WebhookDeliveryHeader = "X-Vtpmd-Delivery"
