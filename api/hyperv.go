package api

import "time"

// Secret is a key-manager secret's metadata; its payload is never shown.
type Secret struct {
	ID        string    `json:"id"`
	Project   string    `json:"project"`
	CreatedAt time.Time `json:"created_at"`
}

// CreateSecretRequest stores key material for a project, e.g. the owner
// guardian certificates a Hyper-V vTPM names in os_vtpm_keys (a PFX in
// base64).
type CreateSecretRequest struct {
	// Project defaults to the caller's.
	Project string `json:"project,omitempty"`
	// Payload is the secret, as text (at most 10,000 bytes).
	Payload string `json:"payload"`
}

// SecretPayload is a secret released to a host for an instance it runs.
type SecretPayload struct {
	ID      string `json:"id"`
	Payload string `json:"payload"`
}

// HostCredential is a host's bearer token for the key manager, shown once.
type HostCredential struct {
	Host  string `json:"host"`
	Token string `json:"token"`
}

// HyperVPlan is the PowerShell plan that gives a Hyper-V VM its vTPM. It
// names the key material by reference: run on the host, it fetches each
// secret with the host's credential.
type HyperVPlan struct {
	InstanceID string   `json:"instance_id"`
	Host       string   `json:"host"`
	VMName     string   `json:"vm_name"`
	Keys       []string `json:"keys"`
	// KeyProtector: "local" (owner guardian, or the host's own without
	// keys) or "hgs" (also the Host Guardian Service's guardian).
	KeyProtector string `json:"key_protector"`
	Script       string `json:"script"`
}
