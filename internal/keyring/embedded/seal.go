package embedded

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"time"

	"github.com/vtpmd/vtpmd/internal/keyring"
)

// The sealed-secret format, version 1 (all integers big-endian):
//
//	offset  size  field
//	0       4     magic "VTKR"
//	4       1     format version, 1
//	5       8     created, Unix nanoseconds (int64)
//	13      1     n = length of project (1..255)
//	14      n     project, UTF-8
//	14+n    12    GCM nonce, random
//	26+n    …     AES-256-GCM ciphertext of the payload, then the 16-byte tag
//
// The associated data is the secret's ID followed by every header byte
// before the nonce. So the ID (which is only the blob's name in the store,
// not in the blob) and the project and creation time (which are in clear
// so that a future List-by-project needs no key) are all authenticated: a
// blob copied to another ID's name, or with its project edited, does not
// open. The deployment's own keys are sealed the same way, their role
// (e.g. "ca") in place of the ID.
const (
	sealMagic     = "VTKR"
	sealVersion   = 1
	masterKeySize = 32 // AES-256
	nonceSize     = 12 // GCM standard nonce; random nonces are safe far beyond any count of secrets here
	tagSize       = 16
	headerFixed   = 4 + 1 + 8 + 1
	// maxSealedLen bounds what an import reads, so a planted huge file
	// cannot exhaust memory.
	maxSealedLen = headerFixed + keyring.MaxProjectLen + nonceSize + keyring.MaxPayloadLen + tagSize
)

// seal encrypts s.Payload under key, bound to s.ID, s.Project and s.Created.
func seal(key []byte, s keyring.Secret) ([]byte, error) {
	aead, err := newAEAD(key)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 0, headerFixed+len(s.Project)+nonceSize+len(s.Payload)+tagSize)
	out = append(out, sealMagic...)
	out = append(out, sealVersion)
	out = binary.BigEndian.AppendUint64(out, uint64(s.Created.UnixNano()))
	out = append(out, byte(len(s.Project)))
	out = append(out, s.Project...)
	header := out
	nonce := make([]byte, nonceSize)
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("reading random nonce: %w", err)
	}
	out = append(out, nonce...)
	return aead.Seal(out, nonce, s.Payload, associatedData(s.ID, header)), nil
}

// unseal parses and decrypts blob stored under id. Every failure wraps
// keyring.ErrCorrupt; none reveals which byte was wrong or any plaintext.
func unseal(key []byte, id string, blob []byte) (keyring.Secret, error) {
	if len(blob) < headerFixed || string(blob[:4]) != sealMagic {
		return keyring.Secret{}, fmt.Errorf("%w: not a sealed secret (bad magic or truncated)", keyring.ErrCorrupt)
	}
	if blob[4] != sealVersion {
		return keyring.Secret{}, fmt.Errorf("%w: unknown format version %d", keyring.ErrCorrupt, blob[4])
	}
	created := int64(binary.BigEndian.Uint64(blob[5:13]))
	n := int(blob[13])
	if n == 0 || len(blob) < headerFixed+n+nonceSize+tagSize {
		return keyring.Secret{}, fmt.Errorf("%w: truncated", keyring.ErrCorrupt)
	}
	header := blob[:headerFixed+n]
	project := string(blob[headerFixed : headerFixed+n])
	nonce := blob[headerFixed+n : headerFixed+n+nonceSize]
	ciphertext := blob[headerFixed+n+nonceSize:]

	aead, err := newAEAD(key)
	if err != nil {
		return keyring.Secret{}, err
	}
	payload, err := aead.Open(nil, nonce, ciphertext, associatedData(id, header))
	if err != nil {
		// GCM cannot tell these apart, so the message names them all.
		return keyring.Secret{}, fmt.Errorf("%w: authentication failed (altered, moved from another id, or sealed under another master key)", keyring.ErrCorrupt)
	}
	return keyring.Secret{
		ID:      id,
		Project: project,
		Payload: payload,
		Created: time.Unix(0, created).UTC(),
	}, nil
}

func associatedData(id string, header []byte) []byte {
	ad := make([]byte, 0, len(id)+len(header))
	ad = append(ad, id...)
	return append(ad, header...)
}

// newAEAD builds the cipher per call: it is cheap next to the file I/O
// around it and keeps Keyring free of shared mutable crypto state.
func newAEAD(key []byte) (cipher.AEAD, error) {
	if len(key) != masterKeySize {
		return nil, fmt.Errorf("master key is %d bytes, want %d", len(key), masterKeySize)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("creating aes cipher: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("creating gcm: %w", err)
	}
	return aead, nil
}
