// Package bearer makes the bearer tokens vtpmd hands out (an attestation
// agent's token, a host's key-manager credential) and checks them. A token
// is shown once, to whoever it is for; vtpmd keeps only its SHA-256.
package bearer

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
)

// New makes a token (32 random bytes, base64url) and the hash that is all
// vtpmd keeps of it.
func New() (token string, hash []byte, err error) {
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", nil, err
	}
	token = base64.RawURLEncoding.EncodeToString(raw)
	return token, Hash(token), nil
}

// Hash is what vtpmd keeps of token: its SHA-256.
func Hash(token string) []byte {
	sum := sha256.Sum256([]byte(token))
	return sum[:]
}

// Matches reports, in constant time, whether token is the one hash was
// kept of. No token matches no hash.
func Matches(token string, hash []byte) bool {
	return token != "" && hash != nil && subtle.ConstantTimeCompare(Hash(token), hash) == 1
}
