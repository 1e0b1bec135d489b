package attest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// Signer signs verdicts as compact JWS (RFC 7515, ES256), so that a
// relying party — a key broker, say — can check them offline against the
// verifier's public key (JWKS, RFC 7517).
type Signer struct {
	key *ecdsa.PrivateKey
	kid string
}

// NewSigner signs with key, an ECDSA P-256 key.
func NewSigner(key *ecdsa.PrivateKey) (*Signer, error) {
	if key.Curve != elliptic.P256() {
		return nil, errors.New("verdict signing key must be ECDSA P-256 (ES256)")
	}
	pub, err := key.PublicKey.Bytes()
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(pub)
	return &Signer{key: key, kid: b64(sum[:8])}, nil
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// Sign returns claims (any JSON object) as a compact JWS.
func (s *Signer) Sign(claims any) (string, error) {
	header, _ := json.Marshal(map[string]string{"alg": "ES256", "typ": "JWT", "kid": s.kid})
	payload, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	input := b64(header) + "." + b64(payload)
	digest := sha256.Sum256([]byte(input))
	r, sv, err := ecdsa.Sign(rand.Reader, s.key, digest[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64) // JWS ES256: r || s, 32 bytes each
	r.FillBytes(sig[:32])
	sv.FillBytes(sig[32:])
	return input + "." + b64(sig), nil
}

// JWKS is the public key set a relying party verifies tokens with.
func (s *Signer) JWKS() []byte {
	pub, _ := s.key.PublicKey.Bytes() // 0x04 || X || Y
	out, _ := json.Marshal(map[string]any{"keys": []map[string]string{{
		"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": s.kid,
		"x": b64(pub[1:33]), "y": b64(pub[33:]),
	}}})
	return out
}

// VerifyToken checks a compact JWS against a JWKS and returns its payload:
// what a relying party does offline.
func VerifyToken(token string, jwks []byte) ([]byte, error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil, errors.New("token: not a compact JWS")
	}
	var header struct{ Alg, Kid string }
	if err := decodePart(parts[0], &header); err != nil || header.Alg != "ES256" {
		return nil, fmt.Errorf("token: header: want alg ES256 (%v)", err)
	}
	var set struct {
		Keys []struct{ Kty, Crv, Kid, X, Y string }
	}
	if err := json.Unmarshal(jwks, &set); err != nil {
		return nil, fmt.Errorf("JWKS: %w", err)
	}
	for _, k := range set.Keys {
		if k.Kid != header.Kid || k.Kty != "EC" || k.Crv != "P-256" {
			continue
		}
		x, errX := base64.RawURLEncoding.DecodeString(k.X)
		y, errY := base64.RawURLEncoding.DecodeString(k.Y)
		if errX != nil || errY != nil || len(x) != 32 || len(y) != 32 {
			return nil, errors.New("JWKS: malformed key")
		}
		pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), append(append([]byte{4}, x...), y...))
		if err != nil {
			return nil, fmt.Errorf("JWKS: %w", err)
		}
		sig, err := base64.RawURLEncoding.DecodeString(parts[2])
		if err != nil || len(sig) != 64 {
			return nil, errors.New("token: malformed signature")
		}
		digest := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
		if !verifyRS(pub, digest[:], sig) {
			return nil, errors.New("token: signature does not verify")
		}
		return base64.RawURLEncoding.DecodeString(parts[1])
	}
	return nil, fmt.Errorf("token: no key %q in the JWKS", header.Kid)
}

func decodePart(part string, v any) error {
	b, err := base64.RawURLEncoding.DecodeString(part)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// verifyRS checks a JWS ES256 signature (r || s) through the ASN.1 form the
// standard library verifies.
func verifyRS(pub *ecdsa.PublicKey, digest, sig []byte) bool {
	return ecdsa.VerifyASN1(pub, digest, asn1Sig(sig[:32], sig[32:]))
}

// asn1Sig encodes r and s as the DER SEQUENCE of two INTEGERs.
func asn1Sig(r, s []byte) []byte {
	integer := func(b []byte) []byte {
		for len(b) > 1 && b[0] == 0 {
			b = b[1:]
		}
		if b[0]&0x80 != 0 {
			b = append([]byte{0}, b...)
		}
		return append([]byte{0x02, byte(len(b))}, b...)
	}
	body := append(integer(r), integer(s)...)
	return append([]byte{0x30, byte(len(body))}, body...)
}
