package server

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
)

// The token route's verdict verifies, with the key set the JWKS route
// serves, as a relying party checks it: vtpmd's issuer, this instance,
// not expired; and it is refused for any other instance.
func TestVerdictTokenRoute(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	signer, err := attest.NewSigner(key)
	if err != nil {
		t.Fatal(err)
	}
	f := newFixtureWith(t, setup{signer: signer})
	if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil); code != 202 {
		t.Fatalf("create: %d", code)
	}
	f.trusted(t, inst)
	var tok api.VerdictToken
	var jwks []byte
	if code := f.call(t, "GET", "/v1/vtpms/"+inst+"/attestation/token", "", nil, &tok); code != 200 {
		t.Fatalf("token: %d", code)
	}
	if code := f.call(t, "GET", "/.well-known/vtpmd/jwks.json", "", nil, &jwks); code != 200 {
		t.Fatalf("jwks: %d %s", code, jwks)
	}
	opts := attest.TokenOptions{JWKS: jwks, Issuer: attest.TokenIssuer, Instance: inst, Host: "h1", Now: time.Now()}
	payload, err := attest.VerifyToken(tok.Token, opts)
	var claims struct {
		Iss, Sub, Project, Host, Verdict string
		Iat, Exp                         int64
	}
	if err != nil || json.Unmarshal(payload, &claims) != nil || claims.Iss != "vtpmd" || claims.Sub != inst ||
		claims.Project != "p1" || claims.Host != "h1" || claims.Verdict != "trusted" || claims.Exp-claims.Iat != int64(attest.TokenLifetime/time.Second) {
		t.Fatalf("verdict token: %s %v", payload, err)
	}
	opts.Instance = "00000000-0000-4000-8000-000000000000"
	if _, err := attest.VerifyToken(tok.Token, opts); !errors.Is(err, attest.ErrTokenClaims) {
		t.Fatalf("the token verified for another instance: %v", err)
	}
}
