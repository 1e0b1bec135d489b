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

// Enrollment is the host's client certificate, for every later call of
// its agent (mTLS).
type Enrollment struct {
	Host string `json:"host"`
	// Certificate is the host's client certificate, DER (base64 in JSON).
	Certificate []byte    `json:"certificate"`
	NotAfter    time.Time `json:"not_after"`
	// CAChain is the host CA's chain, PEM.
	CAChain string `json:"ca_chain"`
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
