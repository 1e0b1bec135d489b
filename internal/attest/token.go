package attest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// TokenIssuer is the iss claim of every verdict token vtpmd signs.
const TokenIssuer = "vtpmd"

// TokenLifetime bounds how long a relying party may rely on a verdict
// token: its exp is this long after its iat.
const TokenLifetime = 5 * time.Minute

// TokenLeeway is the clock skew VerifyToken allows between the verifier
// that signed a token and the relying party checking it, on exp, nbf and
// iat: small against the tokens' five-minute lifetime.
const TokenLeeway = 30 * time.Second

var (
	// ErrTokenSignature means a token is not an ES256 JWS signed by a key
	// of the JWKS: malformed, another algorithm ("none", HS256, …), a kid
	// not in the set, a signature that does not verify, or the malleated
	// twin (r, n−s) of one that does.
	ErrTokenSignature = errors.New("the token is not signed by the verifier")
	// ErrTokenClaims means a token is signed but does not say what the
	// relying party needs: expired or without exp, not valid yet, issued
	// in the future, or another issuer, instance or host than expected.
	// The go-jose/jwt error (jwt.ErrExpired, …) is wrapped too.
	ErrTokenClaims = errors.New("the token's claims do not hold")
)

// Signer signs verdicts as compact JWS (RFC 7515, ES256), so that a
// relying party — a key broker, say — can check them offline against the
// verifier's public key (JWKS, RFC 7517). Tokens and key sets are made by
// go-jose; the key's id is its RFC 7638 thumbprint.
type Signer struct {
	signer jose.Signer
	public jose.JSONWebKey
}

// NewSigner signs with key, an ECDSA P-256 key.
func NewSigner(key *ecdsa.PrivateKey) (*Signer, error) {
	if key.Curve != elliptic.P256() {
		return nil, errors.New("verdict signing key must be ECDSA P-256 (ES256)")
	}
	public := jose.JSONWebKey{Key: &key.PublicKey, Algorithm: string(jose.ES256), Use: "sig"}
	thumb, err := public.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("verdict signing key: %w", err)
	}
	public.KeyID = base64.RawURLEncoding.EncodeToString(thumb)
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: lowS{key: key, public: &public}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, fmt.Errorf("verdict signer: %w", err)
	}
	return &Signer{signer: signer, public: public}, nil
}

// Sign returns claims (any JSON object) as a compact JWS whose header
// names the key (kid).
func (s *Signer) Sign(claims any) (string, error) {
	payload, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	jws, err := s.signer.Sign(payload)
	if err != nil {
		return "", err
	}
	return jws.CompactSerialize()
}

// JWKS is the public key set a relying party verifies tokens with.
func (s *Signer) JWKS() []byte {
	out, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{s.public}})
	if err != nil {
		panic(err) // a P-256 public key always marshals
	}
	return out
}

// p256HalfOrder is n/2 for P-256: a signature's s above it is the
// malleated twin of the one with n−s.
var p256HalfOrder = new(big.Int).Rsh(elliptic.P256().Params().N, 1)

// lowS is a go-jose signer (jose.OpaqueSigner) making ES256 signatures
// with s ≤ n/2. ECDSA accepts (r, s) and (r, n−s) alike; go-jose signs
// either and verifies both, so a token could be re-issued with another
// signature by anyone holding it. vtpmd signs only the low form and
// VerifyToken refuses the other, so a token has one spelling, and a
// relying party that remembers tokens it has seen (or their hashes) is
// not fooled by a second one.
type lowS struct {
	key    *ecdsa.PrivateKey
	public *jose.JSONWebKey
}

var _ jose.OpaqueSigner = lowS{}

func (l lowS) Public() *jose.JSONWebKey { return l.public }

func (l lowS) Algs() []jose.SignatureAlgorithm { return []jose.SignatureAlgorithm{jose.ES256} }

// SignPayload is RFC 7518 §3.4: SHA-256, ECDSA P-256, r ‖ s as 32 bytes
// each.
func (l lowS) SignPayload(payload []byte, alg jose.SignatureAlgorithm) ([]byte, error) {
	if alg != jose.ES256 {
		return nil, jose.ErrUnsupportedAlgorithm
	}
	digest := sha256.Sum256(payload)
	r, s, err := ecdsa.Sign(rand.Reader, l.key, digest[:])
	if err != nil {
		return nil, err
	}
	if s.Cmp(p256HalfOrder) > 0 {
		s.Sub(elliptic.P256().Params().N, s)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return sig, nil
}

// TokenOptions are what a relying party expects of a verdict token. The
// zero value accepts nothing: the key set, the issuer, the instance (or
// AnyInstance) and the time must all be given.
type TokenOptions struct {
	// JWKS is the verifier's key set, as GET /.well-known/vtpmd/jwks.json
	// serves it. Required.
	JWKS []byte
	// Issuer is the iss the token must carry: TokenIssuer for vtpmd.
	// Required.
	Issuer string
	// Instance is the instance the relying party asks about: the token's
	// sub must name it. Required unless AnyInstance.
	Instance string
	// AnyInstance accepts a token about any instance, for a receiver of
	// every verdict (a webhook): it must then act only on the instance the
	// token's sub names. Default false.
	AnyInstance bool
	// Host, when set, is the host the token's host claim must name.
	// Default "": any host.
	Host string
	// Now is the time exp, nbf and iat are checked against (with
	// TokenLeeway). Required: a zero time is refused, not read as now.
	Now time.Time
}

// VerifyToken checks a verdict token as a relying party does, offline, and
// returns its payload (the claims as JSON). In order:
//
//  1. opts are complete (JWKS, Issuer, Instance or AnyInstance, Now);
//  2. the token is a compact JWS whose alg is ES256 (go-jose refuses any
//     other, "none" and HS256 included, before looking at a key);
//  3. its kid names a key of the JWKS that is a public EC P-256 key, not
//     restricted to another use ("use": "sig" or none) or algorithm;
//  4. the signature verifies with that key (go-jose) and its s is at most
//     n/2 (the form vtpmd signs; see lowS);
//  5. the claims (go-jose/jwt Validate, TokenLeeway either way): exp is
//     present and not past, nbf (if any) is not ahead, iat (if any) is not
//     ahead, iss is opts.Issuer, sub is present and is opts.Instance
//     unless AnyInstance;
//  6. host is opts.Host, when that is set.
//
// A failure of 2–4 wraps ErrTokenSignature, of 5–6 ErrTokenClaims.
func VerifyToken(token string, opts TokenOptions) ([]byte, error) {
	switch {
	case len(opts.JWKS) == 0:
		return nil, errors.New("verifying a token: no JWKS given")
	case opts.Issuer == "":
		return nil, errors.New("verifying a token: no expected issuer given")
	case opts.Instance == "" && !opts.AnyInstance:
		return nil, errors.New("verifying a token: no expected instance given (AnyInstance to accept any)")
	case opts.Now.IsZero():
		return nil, errors.New("verifying a token: no time given")
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(opts.JWKS, &set); err != nil {
		return nil, fmt.Errorf("verifying a token: reading the JWKS: %w", err)
	}
	signingKeys := jose.JSONWebKeySet{}
	for _, k := range set.Keys {
		pub, ok := k.Key.(*ecdsa.PublicKey)
		if ok && pub.Curve == elliptic.P256() && (k.Use == "" || k.Use == "sig") &&
			(k.Algorithm == "" || k.Algorithm == string(jose.ES256)) {
			signingKeys.Keys = append(signingKeys.Keys, k)
		}
	}

	jws, err := jose.ParseSignedCompact(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTokenSignature, err)
	}
	// go-jose picks the key by kid (none or an unknown one: refused).
	payload, err := jws.Verify(signingKeys)
	if err != nil {
		return nil, fmt.Errorf("%w: kid %q: %w", ErrTokenSignature, jws.Signatures[0].Header.KeyID, err)
	}
	if sig := jws.Signatures[0].Signature; new(big.Int).SetBytes(sig[32:]).Cmp(p256HalfOrder) > 0 {
		return nil, fmt.Errorf("%w: the signature's s is above n/2 (a malleated signature)", ErrTokenSignature)
	}

	var claims jwt.Claims
	var private struct {
		Host *string `json:"host"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTokenClaims, err)
	}
	if err := json.Unmarshal(payload, &private); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTokenClaims, err)
	}
	if claims.Expiry == nil {
		return nil, fmt.Errorf("%w: no exp: a verdict token must expire", ErrTokenClaims)
	}
	if claims.Subject == "" {
		return nil, fmt.Errorf("%w: no sub: the token names no instance", ErrTokenClaims)
	}
	want := jwt.Expected{Issuer: opts.Issuer, Time: opts.Now}
	if !opts.AnyInstance {
		want.Subject = opts.Instance
	}
	if err := claims.ValidateWithLeeway(want, TokenLeeway); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTokenClaims, err)
	}
	if opts.Host != "" && (private.Host == nil || *private.Host != opts.Host) {
		return nil, fmt.Errorf("%w: the token is not about host %q", ErrTokenClaims, opts.Host)
	}
	return payload, nil
}
