package verifier

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/vtpmd/vtpmd/internal/attest"
)

// NewVerdictKey makes a key to sign verdicts with: ECDSA P-256, PKCS#8
// DER. The caller keeps it sealed (every server replica signs with the
// same one) and clears it after use.
func NewVerdictKey() ([]byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	return x509.MarshalPKCS8PrivateKey(key)
}

// ParseVerdictKey returns the signer of a key NewVerdictKey made.
func ParseVerdictKey(pkcs8 []byte) (*attest.Signer, error) {
	key, err := x509.ParsePKCS8PrivateKey(pkcs8)
	if err != nil {
		// The parse error could quote key bytes; keep it out of the message.
		return nil, errors.New("the verdict key is not a PKCS#8 private key")
	}
	ec, ok := key.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("the verdict key is a %T, not ECDSA", key)
	}
	return attest.NewSigner(ec)
}
