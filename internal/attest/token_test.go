package attest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4/jwt"
)

// now is the relying party's clock in these tests.
var now = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func newTestSigner(t *testing.T) *Signer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewSigner(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// claims are a verdict token's as the server signs them, with changes:
// a nil value removes the claim.
func claims(changes map[string]any) map[string]any {
	c := map[string]any{"iss": TokenIssuer, "sub": "i-1", "host": "hv1", "verdict": "trusted",
		"iat": now.Unix(), "exp": now.Add(5 * time.Minute).Unix()}
	for k, v := range changes {
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
	}
	return c
}

func sign(t *testing.T, s *Signer, c map[string]any) string {
	t.Helper()
	tok, err := s.Sign(c)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func opts(s *Signer) TokenOptions {
	return TokenOptions{JWKS: s.JWKS(), Issuer: TokenIssuer, Instance: "i-1", Now: now}
}

func TestTokenRoundTrip(t *testing.T) {
	s := newTestSigner(t)
	payload, err := VerifyToken(sign(t, s, claims(nil)), opts(s))
	var got map[string]any
	if err != nil || json.Unmarshal(payload, &got) != nil || got["verdict"] != "trusted" || got["sub"] != "i-1" {
		t.Fatalf("round trip: %s %v", payload, err)
	}
	// Every token verifies (r and s of any length), and every one is signed
	// in the low-S form.
	n := elliptic.P256().Params().N
	for i := range 300 {
		tok := sign(t, s, claims(map[string]any{"n": i}))
		if _, err := VerifyToken(tok, opts(s)); err != nil {
			t.Fatalf("token %d: %v", i, err)
		}
		sig, _ := base64.RawURLEncoding.DecodeString(tok[strings.LastIndex(tok, ".")+1:])
		if sv := new(big.Int).SetBytes(sig[32:]); sv.Cmp(new(big.Int).Rsh(n, 1)) > 0 {
			t.Fatalf("token %d is signed with a high s", i)
		}
	}
	// The header names the key by its RFC 7638 thumbprint, as the JWKS does.
	var header struct{ Alg, Typ, Kid string }
	h, _ := base64.RawURLEncoding.DecodeString(strings.Split(sign(t, s, claims(nil)), ".")[0])
	var set struct {
		Keys []struct{ Kid, Kty, Crv, Alg, Use, X, Y string }
	}
	if json.Unmarshal(h, &header) != nil || json.Unmarshal(s.JWKS(), &set) != nil || len(set.Keys) != 1 ||
		header.Alg != "ES256" || header.Typ != "JWT" || header.Kid != set.Keys[0].Kid ||
		set.Keys[0].Kty != "EC" || set.Keys[0].Crv != "P-256" || set.Keys[0].Alg != "ES256" || set.Keys[0].Use != "sig" {
		t.Fatalf("header %s, JWKS %s", h, s.JWKS())
	}
	k := set.Keys[0]
	thumb := sha256.Sum256([]byte(`{"crv":"P-256","kty":"EC","x":"` + k.X + `","y":"` + k.Y + `"}`))
	if k.Kid != base64.RawURLEncoding.EncodeToString(thumb[:]) {
		t.Fatalf("kid %s is not the key's RFC 7638 thumbprint", k.Kid)
	}
	// Within the leeway either side of exp and iat, the token holds.
	for _, c := range []map[string]any{
		{"exp": now.Add(-TokenLeeway + time.Second).Unix()},
		{"iat": now.Add(TokenLeeway - time.Second).Unix()},
		{"nbf": now.Add(TokenLeeway - time.Second).Unix()},
	} {
		if _, err := VerifyToken(sign(t, s, claims(c)), opts(s)); err != nil {
			t.Fatalf("%v: %v", c, err)
		}
	}
	// A webhook receiver takes any instance; a host it names must match.
	o := opts(s)
	o.Instance, o.AnyInstance, o.Host = "", true, "hv1"
	if _, err := VerifyToken(sign(t, s, claims(map[string]any{"sub": "i-2"})), o); err != nil {
		t.Fatalf("AnyInstance: %v", err)
	}
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if _, err := NewSigner(p384); err == nil {
		t.Fatal("a P-384 key accepted for ES256")
	}
}

// Each token a relying party must refuse, and the reason it must give.
func TestTokenRefused(t *testing.T) {
	s := newTestSigner(t)
	good := sign(t, s, claims(nil))
	parts := strings.Split(good, ".")
	kid := s.public.KeyID

	// (r, n−s): the same signature in its other valid ECDSA form.
	sig, _ := base64.RawURLEncoding.DecodeString(parts[2])
	sv := new(big.Int).SetBytes(sig[32:])
	sv.Sub(elliptic.P256().Params().N, sv).FillBytes(sig[32:])
	malleated := parts[0] + "." + parts[1] + "." + base64.RawURLEncoding.EncodeToString(sig)

	// HS256 keyed with the public key set, the classic key-confusion forgery.
	hs := b64(`{"alg":"HS256","typ":"JWT","kid":"`+kid+`"}`) + "." + parts[1]
	mac := hmac.New(sha256.New, s.JWKS())
	mac.Write([]byte(hs))
	hs256 := hs + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))

	other := newTestSigner(t)
	otherKid := sign(t, other, claims(nil))
	unknownKid := b64(`{"alg":"ES256","kid":"nope"}`) + "." + parts[1] + "." + parts[2]
	noKid := b64(`{"alg":"ES256"}`) + "." + parts[1] + "." + parts[2]
	forged := parts[0] + "." + b64(`{"iss":"vtpmd","sub":"i-1","verdict":"trusted","exp":9999999999}`) + "." + parts[2]

	var encOnly map[string][]map[string]any
	json.Unmarshal(s.JWKS(), &encOnly)
	encOnly["keys"][0]["use"] = "enc"
	encJWKS, _ := json.Marshal(encOnly)

	withOpts := func(f func(*TokenOptions)) TokenOptions { o := opts(s); f(&o); return o }
	for _, c := range []struct {
		name  string
		token string
		opts  TokenOptions
		want  error // and, where go-jose/jwt has one, its reason
		jwt   error
	}{
		{"exp in 1970", sign(t, s, claims(map[string]any{"exp": 1})), opts(s), ErrTokenClaims, jwt.ErrExpired},
		{"exp past the leeway", sign(t, s, claims(map[string]any{"exp": now.Add(-TokenLeeway - time.Second).Unix()})), opts(s), ErrTokenClaims, jwt.ErrExpired},
		{"no exp", sign(t, s, claims(map[string]any{"exp": nil})), opts(s), ErrTokenClaims, nil},
		{"nbf in the future", sign(t, s, claims(map[string]any{"nbf": now.Add(time.Hour).Unix()})), opts(s), ErrTokenClaims, jwt.ErrNotValidYet},
		{"iat in the future", sign(t, s, claims(map[string]any{"iat": now.Add(time.Hour).Unix()})), opts(s), ErrTokenClaims, jwt.ErrIssuedInTheFuture},
		{"iss evil", sign(t, s, claims(map[string]any{"iss": "evil"})), opts(s), ErrTokenClaims, jwt.ErrInvalidIssuer},
		{"no iss", sign(t, s, claims(map[string]any{"iss": nil})), opts(s), ErrTokenClaims, jwt.ErrInvalidIssuer},
		{"another instance", sign(t, s, claims(map[string]any{"sub": "i-2"})), opts(s), ErrTokenClaims, jwt.ErrInvalidSubject},
		{"no sub, any instance", sign(t, s, claims(map[string]any{"sub": nil})), withOpts(func(o *TokenOptions) { o.Instance, o.AnyInstance = "", true }), ErrTokenClaims, nil},
		{"another host", good, withOpts(func(o *TokenOptions) { o.Host = "hv2" }), ErrTokenClaims, nil},
		{"malleated signature (r, n−s)", malleated, opts(s), ErrTokenSignature, nil},
		{"alg none", b64(`{"alg":"none","kid":"`+kid+`"}`) + "." + parts[1] + ".", opts(s), ErrTokenSignature, nil},
		{"HS256 with the public key as secret", hs256, opts(s), ErrTokenSignature, nil},
		{"unknown kid", unknownKid, opts(s), ErrTokenSignature, nil},
		{"no kid", noKid, opts(s), ErrTokenSignature, nil},
		{"another verifier's key", otherKid, opts(s), ErrTokenSignature, nil},
		{"the key set of another verifier", good, withOpts(func(o *TokenOptions) { o.JWKS = other.JWKS() }), ErrTokenSignature, nil},
		{"a key for encryption only", good, withOpts(func(o *TokenOptions) { o.JWKS = encJWKS }), ErrTokenSignature, nil},
		{"changed claims", forged, opts(s), ErrTokenSignature, nil},
		{"not a JWS", "a.b", opts(s), ErrTokenSignature, nil},
		// Options left out are refused, not read as "anything goes".
		{"no JWKS", good, withOpts(func(o *TokenOptions) { o.JWKS = nil }), nil, nil},
		{"no issuer expected", good, withOpts(func(o *TokenOptions) { o.Issuer = "" }), nil, nil},
		{"no instance expected", good, withOpts(func(o *TokenOptions) { o.Instance = "" }), nil, nil},
		{"no time", good, withOpts(func(o *TokenOptions) { o.Now = time.Time{} }), nil, nil},
	} {
		payload, err := VerifyToken(c.token, c.opts)
		switch {
		case err == nil:
			t.Errorf("%s: accepted: %s", c.name, payload)
		case c.want != nil && !errors.Is(err, c.want), c.jwt != nil && !errors.Is(err, c.jwt):
			t.Errorf("%s: %v; want %v (%v)", c.name, err, c.want, c.jwt)
		case c.want == nil && (errors.Is(err, ErrTokenClaims) || errors.Is(err, ErrTokenSignature)):
			t.Errorf("%s: %v; want the options refused", c.name, err)
		}
	}
}

func b64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }
