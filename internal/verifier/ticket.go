package verifier

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
)

// A registration keeps nothing on the server until the TPM proves it. The
// agent gets a ticket, what the registration vouched for (subject, EK, AK,
// times), and a credential that only the EK's TPM can open for that AK. The
// credential's secret is HMAC(ticketKey, ticket), so when the agent brings
// ticket and secret back, the secret proves both the TPM and the ticket.
// A stranger's registration therefore disturbs no one else's, and
// unproven registrations write nothing (there is nothing to bound).
//
// The key (Config.TicketKey) is the deployment's, sealed in the store like
// its CAs, so that an agent may register with one server replica and
// activate with another, also across restarts.

// ticketLifetime bounds how long an agent may take to activate.
const ticketLifetime = 5 * time.Minute

// ticket is what a registration vouched for.
type ticket struct {
	Subject  string    `json:"sub"` // the attestation record's key
	IssuedAt time.Time `json:"iat"`
	Expires  time.Time `json:"exp"`
	EKKind   string    `json:"ek_kind"`
	EK       []byte    `json:"ek"` // PKIX DER
	AK       []byte    `json:"ak"` // TPM2B_PUBLIC
}

// NewTicketKey makes a key that ties tickets to credentials: 32 random
// bytes.
func NewTicketKey() []byte {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return k
}

// issue encodes t and the secret its credential must carry.
func (t ticket) issue(key []byte) (raw, secret []byte, err error) {
	if raw, err = json.Marshal(t); err != nil {
		return nil, nil, err
	}
	return raw, ticketSecret(key, raw), nil
}

func ticketSecret(key, raw []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(raw)
	return m.Sum(nil)
}

// redeem checks that secret opens raw for subject now, and decodes it.
func redeem(key, raw, secret []byte, subject string, now time.Time) (ticket, error) {
	var t ticket
	if len(raw) == 0 {
		return t, refusal.Invalid(api.CodeInvalidParameter, "An activation carries the ticket its registration answered with.")
	}
	if !hmac.Equal(secret, ticketSecret(key, raw)) {
		return t, refusal.Forbidden(api.CodeActivationFailed,
			"The credential does not match its ticket: the AK is not in the TPM this registration named, or the ticket was altered; register again.")
	}
	if err := json.Unmarshal(raw, &t); err != nil || t.Subject != subject {
		return t, refusal.Forbidden(api.CodeActivationFailed, "The ticket is for another instance or host.")
	}
	if !now.Before(t.Expires) {
		return t, refusal.Conflict(api.CodeNotRegistered, "The registration expired; register again.")
	}
	return t, nil
}
