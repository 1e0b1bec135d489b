package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"slices"
	"testing"
	"time"
)

// A host CA is a CA with its own common name; its host certificates carry
// what the CA decides, never what the request asks, and end no later than
// the CA itself.
func TestHostCA(t *testing.T) {
	env := newEnv(t)
	c := env.open(t, Options{CommonName: HostCommonName})
	if c.Certificate().Subject.CommonName != HostCommonName {
		t.Fatalf("subject %v", c.Certificate().Subject)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: "other", Organization: []string{"system:operator"}}, DNSNames: []string{"evil.example"},
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := c.IssueHost(csr, "h1")
	if err != nil {
		t.Fatal(err)
	}
	if cert.Subject.CommonName != "h1" || !slices.Equal(cert.Subject.Organization, []string{HostOrganization}) || len(cert.DNSNames) != 0 ||
		!slices.Equal(cert.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) || cert.IsCA ||
		!cert.NotAfter.Equal(t0.Add(HostValidity)) || !cert.NotBefore.Equal(t0.Add(-backdate)) || cert.SerialNumber.BitLen() != 127 {
		t.Fatalf("host certificate: %+v", cert)
	}
	if _, err := c.IssueHost(csr, ""); !errors.Is(err, ErrInvalidCSR) {
		t.Fatalf("no host name: %v", err)
	}

	// Near the CA's end, a host certificate ends with it.
	late := env.open(t, Options{Now: fixedClock(c.Certificate().NotAfter.Add(-24 * time.Hour))})
	if cert, err := late.IssueHost(csr, "h1"); err != nil || !cert.NotAfter.Equal(c.Certificate().NotAfter) {
		t.Fatalf("near the CA's expiry: %v %v", cert.NotAfter, err)
	}
}
