package ca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

// t0 is the fixed clock of these tests.
var t0 = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }

// testEnv is where a CA is kept between a test's opens: the first makes
// it, the later ones load what the first marshalled, as every server
// replica loads the one its store holds.
type testEnv struct {
	pem []byte
}

func newEnv(testing.TB) *testEnv { return &testEnv{} }

func (env *testEnv) open(t testing.TB, opts Options) *CA {
	t.Helper()
	if opts.Now == nil {
		opts.Now = fixedClock(t0)
	}
	if env.pem == nil {
		c, err := New(opts)
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		if env.pem, err = c.MarshalPEM(); err != nil {
			t.Fatalf("MarshalPEM: %v", err)
		}
		return c
	}
	c, err := Load(env.pem, opts)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return c
}

func TestNewCA(t *testing.T) {
	env := newEnv(t)
	c := env.open(t, Options{Organization: "Example Cloud"})
	cert := c.Certificate()

	if cert.Subject.CommonName != "vtpmd deployment CA" || !slices.Equal(cert.Subject.Organization, []string{"Example Cloud"}) {
		t.Errorf("subject = %v", cert.Subject)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("not a CA certificate: IsCA %v, key usage %v", cert.IsCA, cert.KeyUsage)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P384() {
		t.Errorf("public key %T, want ECDSA P-384", cert.PublicKey)
	}
	if cert.SignatureAlgorithm != x509.ECDSAWithSHA384 {
		t.Errorf("signature algorithm %v", cert.SignatureAlgorithm)
	}
	if want := t0.AddDate(10, 0, 0); !cert.NotAfter.Equal(want) || cert.NotBefore.After(t0) {
		t.Errorf("validity %v – %v, want until %v", cert.NotBefore, cert.NotAfter, want)
	}
	if err := cert.CheckSignatureFrom(cert); err != nil {
		t.Errorf("not self-signed: %v", err)
	}
	if len(cert.SubjectKeyId) == 0 {
		t.Error("no subject key identifier: EK certificates would lack an authority key identifier")
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: c.Pool(), CurrentTime: t0}); err != nil {
		t.Errorf("root does not verify against Pool: %v", err)
	}

	block, rest := pem.Decode(c.ChainPEM())
	if block == nil || len(rest) != 0 || !bytes.Equal(block.Bytes, cert.Raw) {
		t.Error("ChainPEM is not the root certificate")
	}
}

func TestLoadGivesSameCA(t *testing.T) {
	env := newEnv(t)
	first := env.open(t, Options{Organization: "A"})

	// Another process: different options and clock.
	second := env.open(t, Options{Organization: "B", Now: fixedClock(t0.Add(24 * time.Hour))})

	if !bytes.Equal(first.Certificate().Raw, second.Certificate().Raw) || !second.key.Equal(first.key) {
		t.Fatal("loading gave a different CA")
	}
	// The reopened CA's key is the same key: its certificates verify
	// against the first CA's pool and the other way round.
	ekKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, tc := range []struct {
		issuer, verifier *CA
	}{{second, first}, {first, second}} {
		der, err := tc.issuer.IssueEK(&ekKey.PublicKey, swtpmProfile)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := VerifyEK(der, VerifyOptions{Roots: tc.verifier.Pool(), CurrentTime: t0.Add(48 * time.Hour)}); err != nil {
			t.Errorf("VerifyEK across reopen: %v", err)
		}
	}
}

func TestLoadRefusesDamage(t *testing.T) {
	c := newEnv(t).open(t, Options{})
	good, err := c.MarshalPEM()
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM := c.ChainPEM(), good[len(c.ChainPEM()):]
	otherKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	otherPKCS8, _ := x509.MarshalPKCS8PrivateKey(otherKey)
	otherKeyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: otherPKCS8})
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: c.cert.SerialNumber, NotAfter: t0.Add(time.Hour)},
		c.cert, &otherKey.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	leafPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER})
	for name, data := range map[string][]byte{
		"empty":            nil,
		"certificate only": certPEM,
		"key only":         keyPEM,
		"key first":        append(bytes.Clone(keyPEM), certPEM...),
		"another key":      append(bytes.Clone(certPEM), otherKeyPEM...),
		"not a key":        append(bytes.Clone(certPEM), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("not a key")})...),
		"not a CA":         append(leafPEM, otherKeyPEM...),
		"trailing data":    append(bytes.Clone(good), "more"...),
	} {
		if _, err := Load(data, Options{}); !errors.Is(err, ErrDamaged) {
			t.Errorf("%s: Load = %v, want ErrDamaged", name, err)
		}
	}
	if _, err := Load(good, Options{}); err != nil {
		t.Errorf("Load of the good PEM: %v", err)
	}
}

// rsaKey is shared by tests: generating RSA keys is slow under -race.
var rsaKey = sync.OnceValue(func() *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	return k
})
