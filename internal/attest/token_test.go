package attest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"strings"
	"testing"
)

func TestTokenRoundTrip(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	s, err := NewSigner(key)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := s.Sign(map[string]any{"sub": "i-1", "verdict": "trusted"})
	if err != nil {
		t.Fatal(err)
	}
	payload, err := VerifyToken(tok, s.JWKS())
	var claims map[string]any
	if err != nil || json.Unmarshal(payload, &claims) != nil || claims["verdict"] != "trusted" {
		t.Fatalf("round trip: %s %v", payload, err)
	}
	// r and s of every length and sign bit (the DER re-encoding) verify.
	for i := range 300 {
		tok, _ := s.Sign(map[string]int{"n": i})
		if _, err := VerifyToken(tok, s.JWKS()); err != nil {
			t.Fatalf("token %d: %v", i, err)
		}
	}
	// Any change to the claims breaks the signature.
	parts := strings.Split(tok, ".")
	forged := parts[0] + "." + b64([]byte(`{"sub":"i-1","verdict":"trusted","x":1}`)) + "." + parts[2]
	if _, err := VerifyToken(forged, s.JWKS()); err == nil {
		t.Fatal("forged claims verified")
	}
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	os, _ := NewSigner(other)
	if _, err := VerifyToken(tok, os.JWKS()); err == nil {
		t.Fatal("verified with another verifier's keys")
	}
	if _, err := VerifyToken("a.b", s.JWKS()); err == nil {
		t.Fatal("garbage verified")
	}
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if _, err := NewSigner(p384); err == nil {
		t.Fatal("a P-384 key accepted for ES256")
	}
}
