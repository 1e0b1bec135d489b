// Package keyrelease is a key-broker release (internal/broker) on the
// wire and in the guest: wrapping a secret for one vTPM, opening it there,
// and what the guest keeps of it until it is revoked. It imports nothing
// of the server, so the guest agent stays small.
//
// The server wraps a release (Wrap) with a fresh AES-256 key that it
// protects with TPM2_MakeCredential (done in software) to the instance's
// registered EK and AK name, and seals the payload under that key with
// AES-256-GCM; the guest recovers the key with TPM2_ActivateCredential in
// its vTPM (Unwrap), which the TPM performs only if it holds both the EK's
// private key and a loaded object of that name (TPM 2.0 Part 1, 24
// "Credential Protection"). A copy of the answer on another machine, or a
// stolen agent token, opens nothing (docs/key-broker.md).
package keyrelease

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attestor"
)

// magic starts every wrapped release: the format and its version.
var magic = []byte("vtpmd-wrapped-secret/1\x00")

// Bounds of a wrapped release's fields, which Parse enforces: a
// TPM2B_ID_OBJECT and a TPM2B_ENCRYPTED_SECRET for RSA-2048 or P-256 EKs
// are well under 1 KiB; the binding is names and ids; the payload is at
// most MaxPayload.
const (
	maxCredential = 1024
	maxBinding    = 1024
	// MaxPayload is the largest payload a release carries (the key
	// manager's limit).
	MaxPayload = 10000
	keySize    = 32 // AES-256
)

// Wrapped is a release as it travels: the credential that carries the AES
// key to the TPM, and the payload sealed under that key, bound (GCM
// additional data) to what was released to whom.
type Wrapped struct {
	CredentialBlob []byte // TPM2B_ID_OBJECT contents
	EncryptedSeed  []byte // TPM2B_ENCRYPTED_SECRET contents
	// Binding is the additional data of the seal: which secret, for which
	// instance's vTPM, which release (see Binding).
	Binding    []byte
	Nonce      []byte // 12 bytes, GCM's
	Ciphertext []byte // payload, then the 16-byte tag
}

// Binding is what a release is for, sealed with it: the guest checks that
// it is the secret it asked for, for its own instance.
func Binding(instanceID, incarnation, name, releaseID string) []byte {
	var b bytes.Buffer
	for _, f := range []string{instanceID, incarnation, name, releaseID} {
		b.WriteString(f)
		b.WriteByte(0)
	}
	return b.Bytes()
}

// Wrap seals payload for the TPM holding ek (the instance's registered EK)
// and an object named akName (its registered AK): a fresh AES-256 key,
// carried by a credential (TPM2_MakeCredential in software, as
// attest.NewChallenge), seals payload with binding as additional data.
func Wrap(ek crypto.PublicKey, akName, binding, payload []byte) (*Wrapped, error) {
	if len(payload) == 0 || len(payload) > MaxPayload {
		return nil, fmt.Errorf("payload of %d bytes (1 to %d)", len(payload), MaxPayload)
	}
	if len(binding) > maxBinding {
		return nil, fmt.Errorf("binding of %d bytes (at most %d)", len(binding), maxBinding)
	}
	key := make([]byte, keySize)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	defer clear(key)
	ch, err := attest.NewChallenge(ek, &attest.AK{Name: akName}, key)
	if err != nil {
		return nil, err
	}
	gcm, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	w := &Wrapped{CredentialBlob: ch.CredentialBlob, EncryptedSeed: ch.EncryptedSeed, Binding: binding, Nonce: make([]byte, gcm.NonceSize())}
	if _, err := rand.Read(w.Nonce); err != nil {
		return nil, err
	}
	w.Ciphertext = gcm.Seal(nil, w.Nonce, payload, binding)
	return w, nil
}

func newGCM(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// Marshal is w's wire form: magic, then each field as a big-endian
// uint16 length and its bytes (the ciphertext's length is a uint32).
func (w *Wrapped) Marshal() []byte {
	out := bytes.Clone(magic)
	for _, f := range [][]byte{w.CredentialBlob, w.EncryptedSeed, w.Binding, w.Nonce} {
		out = binary.BigEndian.AppendUint16(out, uint16(len(f)))
		out = append(out, f...)
	}
	out = binary.BigEndian.AppendUint32(out, uint32(len(w.Ciphertext)))
	return append(out, w.Ciphertext...)
}

// ErrMalformed: the bytes are not a wrapped release of this format.
var ErrMalformed = errors.New("not a wrapped secret")

// Parse reads a wrapped release (Marshal's form), refusing one with a
// field out of bounds, a nonce of another size than GCM's, or bytes left
// over. It copies nothing it does not return.
func Parse(b []byte) (*Wrapped, error) {
	rest, ok := bytes.CutPrefix(b, magic)
	if !ok {
		return nil, fmt.Errorf("%w: no %q header", ErrMalformed, magic[:len(magic)-1])
	}
	var w Wrapped
	for _, f := range []struct {
		dst *[]byte
		max int
	}{{&w.CredentialBlob, maxCredential}, {&w.EncryptedSeed, maxCredential}, {&w.Binding, maxBinding}, {&w.Nonce, 12}} {
		if len(rest) < 2 {
			return nil, fmt.Errorf("%w: truncated", ErrMalformed)
		}
		n := int(binary.BigEndian.Uint16(rest))
		rest = rest[2:]
		if n > f.max || n > len(rest) {
			return nil, fmt.Errorf("%w: a field of %d bytes", ErrMalformed, n)
		}
		*f.dst, rest = rest[:n:n], rest[n:]
	}
	if len(w.Nonce) != 12 {
		return nil, fmt.Errorf("%w: a nonce of %d bytes", ErrMalformed, len(w.Nonce))
	}
	if len(w.CredentialBlob) == 0 || len(w.EncryptedSeed) == 0 {
		return nil, fmt.Errorf("%w: no credential", ErrMalformed)
	}
	if len(rest) < 4 {
		return nil, fmt.Errorf("%w: truncated", ErrMalformed)
	}
	n := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	if n < 16 || n > MaxPayload+16 || int(n) != len(rest) {
		return nil, fmt.Errorf("%w: a ciphertext of %d bytes with %d left", ErrMalformed, n, len(rest))
	}
	w.Ciphertext = rest
	return &w, nil
}

// ErrNotOpened: the key the TPM gave back does not open the payload (it
// was changed on the way).
var ErrNotOpened = errors.New("the wrapped secret does not open with the key its credential carried")

// Open decrypts w's payload with key, the AES key its credential carried.
func (w *Wrapped) Open(key []byte) ([]byte, error) {
	if len(key) != keySize {
		return nil, fmt.Errorf("%w: a key of %d bytes", ErrNotOpened, len(key))
	}
	gcm, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	out, err := gcm.Open(nil, w.Nonce, w.Ciphertext, w.Binding)
	if err != nil {
		return nil, ErrNotOpened
	}
	return out, nil
}

// Unwrap recovers w's payload in tpm: TPM2_ActivateCredential with the AK
// (loaded at ak) and the EK at ek gives back the AES key, which opens the
// payload. Another TPM, or this one without that AK, fails the activation
// (TPM_RC_INTEGRITY or a policy or handle error from the TPM): nothing is
// opened.
func Unwrap(tpm transport.TPM, ak tpm2.NamedHandle, ek tpm2.TPMHandle, w *Wrapped) ([]byte, error) {
	key, err := attestor.ActivateCredential(tpm, ak, ek, api.CredentialChallenge{CredentialBlob: w.CredentialBlob, EncryptedSeed: w.EncryptedSeed})
	if err != nil {
		return nil, fmt.Errorf("activating the release's credential: %w", err)
	}
	defer clear(key)
	return w.Open(key)
}
