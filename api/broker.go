package api

import "time"

// CreateBrokerSecretRequest stores a secret that vtpmd releases to an
// instance's vTPM only while the instance and its host are trusted
// (POST /v1/broker/secrets). At least one of ReleaseTo and Policy is
// given.
type CreateBrokerSecretRequest struct {
	// Name is the secret's name in its project: 1 to 64 letters, digits,
	// '.', '_' and '-', starting with a letter or digit.
	Name string `json:"name"`
	// Project owns it; default the caller's (the operator names one).
	Project string `json:"project,omitempty"`
	// Payload is the secret (1 to 10000 bytes); no answer carries it.
	Payload []byte `json:"payload"`
	// ReleaseTo lists the instances (of the project) it may be released
	// to; empty: any instance of the project judged by Policy.
	ReleaseTo []string `json:"release_to,omitempty"`
	// Policy names the policy (the project's, else the operator's) an
	// instance must be judged by to get it.
	Policy string `json:"policy,omitempty"`
	// MaxEvidenceAge bounds how old the instance's and its host's last
	// genuine evidence may be at a release (a Go duration, "90s"); default
	// 2m, at most 1h.
	MaxEvidenceAge string `json:"max_evidence_age,omitempty"`
}

// BrokerSecret is a released secret's record: never its payload.
type BrokerSecret struct {
	Name           string    `json:"name"`
	Project        string    `json:"project"`
	ReleaseTo      []string  `json:"release_to,omitempty"`
	Policy         string    `json:"policy,omitempty"`
	MaxEvidenceAge string    `json:"max_evidence_age"`
	CreatedAt      time.Time `json:"created_at"`
	// Releases are the instances it was released to, as of now.
	Releases []SecretRelease `json:"releases,omitempty"`
}

// SecretRelease is a secret's release to one instance's vTPM: holding, or
// revoked (when the instance or its host stopped being trusted).
type SecretRelease struct {
	InstanceID string    `json:"instance_id"`
	ReleasedAt time.Time `json:"released_at"`
	Releases   int64     `json:"releases"`
	RevokedAt  time.Time `json:"revoked_at,omitzero"`
	Reason     string    `json:"reason,omitempty"`
}

// BrokerSecretList is a project's secrets, by name.
type BrokerSecretList struct {
	Items []BrokerSecret `json:"items"`
}

// WrappedSecret is a secret released to an instance's registered agent
// (POST /v1/vtpms/{id}/secrets/{secret}/release): the payload sealed so
// that only the instance's vTPM opens it (docs/key-broker.md).
type WrappedSecret struct {
	Name       string `json:"name"`
	InstanceID string `json:"instance_id"`
	// ReleaseID names this release (in the events, and in the binding).
	ReleaseID string `json:"release_id"`
	// EKHandle is the persistent handle of the EK the credential is for.
	EKHandle string `json:"ek_handle"`
	// Wrapped is the credential and the sealed payload, in the wire form
	// internal/keyrelease's Parse reads.
	Wrapped []byte `json:"wrapped"`
}
