// Package attest holds the attestation protocol's server side as pure
// functions: turning an EK into the key a credential is encrypted to,
// checking an attestation key (AK), making the credential-activation
// challenge, verifying quotes, replaying event logs and judging PCRs
// against a policy. Nothing here does I/O; the registrar and verifier
// services call it with what they stored and received.
package attest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/subtle"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// EKPublic rebuilds the TPM public area of an EK made from the TCG default
// templates (EK Credential Profile L-1 for RSA-2048, L-2 for ECC P-256)
// from its public key. Its name and symmetric parameters are what a
// credential for that TPM is bound to.
func EKPublic(pub crypto.PublicKey) (*tpm2.TPMTPublic, error) {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() != 2048 || k.E != 65537 {
			return nil, errors.New("an RSA EK must be 2048 bits with exponent 65537 (template L-1)")
		}
		t := tpm2.RSAEKTemplate
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.FillBytes(make([]byte, 256))})
		return &t, nil
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return nil, errors.New("an ECC EK must be on NIST P-256 (template L-2)")
		}
		point, err := k.Bytes() // 0x04 || X || Y
		if err != nil {
			return nil, fmt.Errorf("ECC EK: %w", err)
		}
		t := tpm2.ECCEKTemplate
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: point[1:33]},
			Y: tpm2.TPM2BECCParameter{Buffer: point[33:]},
		})
		return &t, nil
	}
	return nil, fmt.Errorf("unsupported EK key type %T", pub)
}

// The kinds of EK vtpmd makes, as the API names them (ek_kind).
const (
	EKKindRSA2048 = "rsa2048"       // TCG template L-1
	EKKindECCP256 = "ecc-nist-p256" // TCG template L-2
)

// EKKind names the kind of EK pub is: EKKindRSA2048 or EKKindECCP256. Any
// other key is no EK of those templates: an error says why.
func EKKind(pub crypto.PublicKey) (string, error) {
	if _, err := EKPublic(pub); err != nil {
		return "", err
	}
	if _, ok := pub.(*rsa.PublicKey); ok {
		return EKKindRSA2048, nil
	}
	return EKKindECCP256, nil
}

// RSAAKTemplate is the attestation key guest agents make: a restricted
// RSA-2048 signing key (RSASSA, SHA-256) that can sign only TPM-made
// structures and never leaves its TPM.
var RSAAKTemplate = tpm2.TPMTPublic{
	Type: tpm2.TPMAlgRSA, NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
		UserWithAuth: true, Restricted: true, SignEncrypt: true},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
		Scheme: tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgRSASSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgRSASSA, &tpm2.TPMSSigSchemeRSASSA{HashAlg: tpm2.TPMAlgSHA256})},
		KeyBits: 2048,
	}),
}

// AK is a checked attestation key, parsed once (ParseAK) for every quote
// it signs: a verifier keeps it for as long as the registration lasts.
type AK struct {
	Public tpm2.TPMTPublic
	Key    crypto.PublicKey // *rsa.PublicKey or *ecdsa.PublicKey
	Name   []byte           // the TPM name: nameAlg || H(public area)
	rsa    *rsaKey          // an RSA Key, ready for checks
}

// ParseAK reads a TPM2B_PUBLIC (as TPM2_Create or ReadPublic return it) and
// accepts it only as a key that can serve as an AK: a restricted signing
// key that never leaves its TPM and was generated inside it (fixedTPM,
// fixedParent, sensitiveDataOrigin), not a decryption key, SHA-256 named,
// RSA-2048 or ECC P-256.
func ParseAK(tpm2bPublic []byte) (*AK, error) {
	b, err := tpm2.Unmarshal[tpm2.TPM2BPublic](tpm2bPublic)
	if err != nil {
		return nil, fmt.Errorf("AK public area: %w", err)
	}
	pub, err := b.Contents()
	if err != nil {
		return nil, fmt.Errorf("AK public area: %w", err)
	}
	a := pub.ObjectAttributes
	var missing []string
	for _, c := range []struct {
		ok   bool
		name string
	}{
		{a.Restricted, "restricted"}, {a.SignEncrypt, "sign"}, {!a.Decrypt, "not decrypt"},
		{a.FixedTPM, "fixedTPM"}, {a.FixedParent, "fixedParent"}, {a.SensitiveDataOrigin, "sensitiveDataOrigin"},
		{pub.NameAlg == tpm2.TPMAlgSHA256, "nameAlg SHA-256"},
	} {
		if !c.ok {
			missing = append(missing, c.name)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("the key cannot be an attestation key: it lacks %v", missing)
	}
	key, err := tpm2.Pub(*pub)
	if err != nil {
		return nil, fmt.Errorf("AK public key: %w", err)
	}
	ak := &AK{Public: *pub, Key: key}
	switch k := key.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() != 2048 {
			return nil, fmt.Errorf("an RSA AK must be 2048 bits, not %d", k.N.BitLen())
		}
		if ak.rsa, err = newRSAKey(k); err != nil {
			return nil, fmt.Errorf("AK public key: %w", err)
		}
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return nil, errors.New("an ECC AK must be on NIST P-256")
		}
	default:
		return nil, fmt.Errorf("unsupported AK key type %T", key)
	}
	name, err := tpm2.ObjectName(pub)
	if err != nil {
		return nil, err
	}
	ak.Name = name.Buffer
	return ak, nil
}

// Challenge is a credential that only the TPM holding the EK can open, and
// only for the key named AK.Name (TPM2_ActivateCredential checks both).
type Challenge struct {
	Secret         []byte // what the TPM must give back; keep it server-side
	CredentialBlob []byte // TPM2B_ID_OBJECT contents
	EncryptedSeed  []byte // TPM2B_ENCRYPTED_SECRET contents
}

// NewChallenge makes a credential-activation challenge for ak in the TPM of
// ek (MakeCredential, done in software) that releases secret (at most 32
// bytes; nil: a random one).
func NewChallenge(ek crypto.PublicKey, ak *AK, secret []byte) (*Challenge, error) {
	ekPub, err := EKPublic(ek)
	if err != nil {
		return nil, err
	}
	kem, err := tpm2.ImportEncapsulationKey(ekPub)
	if err != nil {
		return nil, fmt.Errorf("EK: %w", err)
	}
	if secret == nil {
		secret = make([]byte, 32)
		if _, err := rand.Read(secret); err != nil {
			return nil, err
		}
	}
	blob, seed, err := tpm2.CreateCredential(rand.Reader, kem, ak.Name, secret)
	if err != nil {
		return nil, fmt.Errorf("making the credential: %w", err)
	}
	return &Challenge{Secret: secret, CredentialBlob: blob, EncryptedSeed: seed}, nil
}

// Answer reports whether the TPM's answer to c proves the AK is in the
// EK's TPM.
func (c *Challenge) Answer(got []byte) bool {
	return subtle.ConstantTimeCompare(got, c.Secret) == 1
}
