package api

import "time"

// RegisterRequest starts registering a guest's attestation key (AK).
type RegisterRequest struct {
	// EKKind picks the EK the challenge is encrypted to: rsa2048
	// (default) or ecc-nist-p256.
	EKKind string `json:"ek_kind,omitempty"`
	// EKPublic, when given, is the EK the guest reads from its TPM (PKIX
	// DER): it must be the one vtpmd made for the instance.
	EKPublic []byte `json:"ek_public,omitempty"`
	// AKPublic is the AK's TPM2B_PUBLIC.
	AKPublic []byte `json:"ak_public"`
}

// CredentialChallenge is TPM2_MakeCredential's output for the guest's
// TPM2_ActivateCredential.
type CredentialChallenge struct {
	EKHandle       string `json:"ek_handle"`
	CredentialBlob []byte `json:"credential_blob"`
	EncryptedSeed  []byte `json:"encrypted_seed"`
}

// ActivateRequest answers a CredentialChallenge.
type ActivateRequest struct {
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
}

// PolicyRequest sets an instance's measured-boot policy.
type PolicyRequest struct {
	// Learn takes the last accepted evidence as the reference.
	Learn bool `json:"learn"`
	// PCRs are the PCRs the policy covers; default: every PCR quoted.
	PCRs []int `json:"pcrs,omitempty"`
}

// Attestation is an instance's attestation status.
type Attestation struct {
	InstanceID string `json:"instance_id"`
	// State: unregistered, challenged (registration waits for the
	// credential) or registered.
	State        string    `json:"state"`
	RegisteredAt time.Time `json:"registered_at,omitzero"`
	// Verdict: pending (no evidence or no policy yet), trusted, untrusted,
	// or stale (no evidence for several rounds).
	Verdict    string         `json:"verdict"`
	Reasons    []string       `json:"reasons,omitempty"`
	VerifiedAt time.Time      `json:"verified_at,omitzero"`
	PolicyPCRs []int          `json:"policy_pcrs,omitempty"`
	PCRs       map[int][]byte `json:"pcrs,omitempty"`
}

// VerdictToken is an attestation verdict signed by the verifier: a JWT
// (ES256) whose claims are iss, sub (the instance), iat, exp, project,
// host, verdict, reasons, verified_at and policy_pcrs. The key is at
// GET /.well-known/vtpmd/jwks.json.
type VerdictToken struct {
	Token string `json:"token"`
}
