package server

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
	"strings"
)

// newBearer makes a bearer token (32 random bytes) and the SHA-256 that
// is all vtpmd keeps of it.
func newBearer() (token string, hash []byte, err error) {
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", nil, err
	}
	token = base64.RawURLEncoding.EncodeToString(raw)
	sum := sha256.Sum256([]byte(token))
	return token, sum[:], nil
}

// bearerHash is the SHA-256 of the request's bearer token; ok is false
// when it carries none.
func bearerHash(r *http.Request) (hash []byte, ok bool) {
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || token == "" {
		return nil, false
	}
	sum := sha256.Sum256([]byte(token))
	return sum[:], true
}
