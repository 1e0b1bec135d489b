package verifier

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/keyring"
)

// OpenSigner opens the key that signs verdicts, making it on first start:
// an ECDSA P-256 key sealed by the key manager (a system secret, as the
// CA's key), whose secret id is kept in refFile. The secret and the file
// are made by keyring.CreateRecorded: if the file cannot be written the
// secret goes again; a crash between the two leaves one unused system
// secret.
func OpenSigner(ctx context.Context, refFile string, kr keyring.Keyring) (*attest.Signer, error) {
	ref, err := os.ReadFile(refFile)
	if errors.Is(err, fs.ErrNotExist) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, err
		}
		_, err = keyring.CreateRecorded(ctx, kr, ca.KeyProject, der, func(id string) error {
			return atomicfile.Write(refFile, []byte(id), 0o600)
		})
		clear(der)
		if err != nil {
			return nil, err
		}
		return attest.NewSigner(key)
	}
	if err != nil {
		return nil, err
	}
	secret, err := kr.Get(ctx, strings.TrimSpace(string(ref)))
	if err != nil {
		return nil, err
	}
	defer clear(secret.Payload)
	key, err := x509.ParsePKCS8PrivateKey(secret.Payload)
	if err != nil {
		// The parse error could quote key bytes; keep it out of the message.
		return nil, fmt.Errorf("the verdict key's secret %s is not a PKCS#8 private key", strings.TrimSpace(string(ref)))
	}
	ec, ok := key.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("the verdict key is a %T, not ECDSA", key)
	}
	return attest.NewSigner(ec)
}
