package attest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"math/big"
	"strings"
	"testing"
	"time"
)

func testCA(t *testing.T, name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return cert, key
}

// An EK certificate shaped as TPM vendors make them (empty subject, a
// critical subjectAltName holding only a directoryName) chains to its CA
// and to no other.
func TestVerifyEKCertificate(t *testing.T) {
	ca, caKey := testCA(t, "vendor EK CA")
	other, _ := testCA(t, "other CA")
	ek, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	dirName, _ := asn1.Marshal(pkix.Name{CommonName: "tpm"}.ToRDNSequence())
	san, _ := asn1.Marshal([]asn1.RawValue{{Class: 2, Tag: 4, IsCompound: true, Bytes: dirName}})
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:        x509.KeyUsageKeyEncipherment,
		ExtraExtensions: []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: san}}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &ek.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	pub, err := VerifyEKCertificate(der, pool)
	if err != nil {
		t.Fatal(err)
	}
	if !ek.PublicKey.Equal(pub) {
		t.Fatal("returned key is not the certified EK")
	}
	otherPool := x509.NewCertPool()
	otherPool.AddCert(other)
	if _, err := VerifyEKCertificate(der, otherPool); err == nil || !strings.Contains(err.Error(), "unknown authority") {
		t.Fatalf("another CA's pool: err = %v", err)
	}
	if _, err := VerifyEKCertificate(der, nil); err == nil {
		t.Fatal("no roots: accepted")
	}
	if _, err := VerifyEKCertificate([]byte("junk"), pool); err == nil {
		t.Fatal("junk: accepted")
	}
}
