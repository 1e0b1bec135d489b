package attest

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"math/big"
	"testing"
)

// TestRSAKeyAgreesWithCryptoRSA checks the parsed key's RSASSA check
// against crypto/rsa's on good signatures and every kind of bad one.
func TestRSAKeyAgreesWithCryptoRSA(t *testing.T) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	k, err := newRSAKey(&priv.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("a quote"))
	good, err := rsa.SignPKCS1v15(rand.Reader, priv, crypto.SHA256, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	other := sha256.Sum256([]byte("another quote"))
	d384 := sha512.Sum384([]byte("a quote"))
	sha384Sig, _ := rsa.SignPKCS1v15(rand.Reader, priv, crypto.SHA384, d384[:])
	pss, _ := rsa.SignPSS(rand.Reader, priv, crypto.SHA256, digest[:], nil)
	// s ≥ n opens to something, but is not a signature.
	over := new(big.Int).Add(new(big.Int).SetBytes(good), priv.N).Bytes()
	type check struct {
		digest [sha256.Size]byte
		sig    []byte
		want   bool
	}
	cases := map[string]check{
		"good":           {digest, good, true},
		"other digest":   {other, good, false},
		"short":          {digest, good[1:], false},
		"long":           {digest, append([]byte{0}, good...), false},
		"empty":          {digest, nil, false},
		"SHA-384 inside": {digest, sha384Sig, false},
		"PSS":            {digest, pss, false},
		"zero":           {digest, make([]byte, 256), false},
		"n":              {digest, priv.N.Bytes(), false},
	}
	if len(over) == 256 {
		cases["s + n"] = check{digest, over, false}
	}
	for i := 0; i < len(good); i += 17 {
		bad := append([]byte(nil), good...)
		bad[i] ^= 0x40
		cases[fmt.Sprintf("bit flipped in byte %d", i)] = check{digest, bad, false}
	}
	for name, c := range cases {
		got := k.verify(&c.digest, c.sig)
		lib := rsa.VerifyPKCS1v15(&priv.PublicKey, crypto.SHA256, c.digest[:], c.sig) == nil
		if got != c.want || lib != c.want {
			t.Errorf("%s: parsed key says %v, crypto/rsa %v; want %v", name, got, lib, c.want)
		}
	}
	if _, err := newRSAKey(&rsa.PublicKey{N: priv.N, E: 4}); err == nil {
		t.Error("an even exponent was accepted")
	}
}
