package attest

import (
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"errors"

	"filippo.io/bigmod"
)

// rsaKey is an RSA public key parsed once for RSASSA-PKCS1-v1_5 SHA-256
// checks: its modulus in the Montgomery form the exponentiation works in,
// and the encoded message every signature must open to but for the digest.
// crypto/rsa rebuilds the modulus on every check, a third of its cost.
type rsaKey struct {
	n      *bigmod.Modulus
	e      uint
	prefix []byte // EMSA-PKCS1-v1_5 of a SHA-256 digest, without the digest
}

// sha256DigestInfo is the DER of the DigestInfo's algorithm for SHA-256
// (RFC 8017, 9.2, note 1), which precedes the digest.
var sha256DigestInfo = []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}

func newRSAKey(pub *rsa.PublicKey) (*rsaKey, error) {
	if pub.E < 3 || pub.E&1 == 0 {
		return nil, errors.New("an RSA key's exponent must be odd and at least 3")
	}
	n, err := bigmod.NewModulus(pub.N.Bytes())
	if err != nil {
		return nil, err
	}
	k := n.Size()
	if k < len(sha256DigestInfo)+sha256.Size+11 {
		return nil, errors.New("the RSA key is too small for a SHA-256 signature")
	}
	// EM = 0x00 || 0x01 || PS (0xff…, at least 8) || 0x00 || DigestInfo || digest
	prefix := make([]byte, k-sha256.Size)
	prefix[1] = 0x01
	ps := prefix[2 : len(prefix)-1-len(sha256DigestInfo)]
	for i := range ps {
		ps[i] = 0xff
	}
	copy(prefix[len(prefix)-len(sha256DigestInfo):], sha256DigestInfo)
	return &rsaKey{n: n, e: uint(pub.E), prefix: prefix}, nil
}

// verify reports whether sig is an RSASSA-PKCS1-v1_5 signature of the
// SHA-256 digest (RFC 8017, 8.2.2: the signature opens to exactly the
// encoding of the digest, compared whole, nothing parsed out of it).
func (k *rsaKey) verify(digest *[sha256.Size]byte, sig []byte) bool {
	if len(sig) != k.n.Size() {
		return false
	}
	s, err := bigmod.NewNat().SetBytes(sig, k.n)
	if err != nil { // sig ≥ n
		return false
	}
	em := bigmod.NewNat().ExpShortVarTime(s, k.e, k.n).Bytes(k.n)
	return subtle.ConstantTimeCompare(em[:len(k.prefix)], k.prefix)&subtle.ConstantTimeCompare(em[len(k.prefix):], digest[:]) == 1
}
