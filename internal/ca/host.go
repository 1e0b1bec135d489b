package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"time"
)

// HostCommonName is the CN of the deployment's host CA, the second CA of a
// deployment: it issues the client certificates of hosts' agents
// (IssueHost), and nothing else.
const HostCommonName = "vtpmd host CA"

// HostOrganization is the O= of every host certificate. It cannot be a
// project id (no colons in those), so a host certificate never passes for
// a tenant's or the operator's.
const HostOrganization = "system:host"

// HostValidity is how long a host certificate is valid: short enough that
// a lost one ends on its own, long enough that an agent renews it rarely.
// Revocation (a serial allow-list in the store) stops one at once.
const HostValidity = 90 * 24 * time.Hour

// IssueHost certifies the key of csrDER (a PKCS#10 request in DER, made on
// the host, whose private key never leaves it) as host's agent's client
// certificate. Checks, in order:
//
//  1. csrDER parses as one certificate request, with nothing after it;
//  2. its signature is valid (the requester holds the key);
//  3. its key is ECDSA P-256 or P-384, or RSA of 2048 bits or more.
//
// The certificate says only what the CA decides, never what the request
// asks: subject CN host and O HostOrganization, extended key usage
// clientAuth alone, key usage digitalSignature, no names, valid for
// HostValidity (not past the CA's own expiry), a random serial. A request
// that fails a check is ErrInvalidCSR.
func (c *CA) IssueHost(csrDER []byte, host string) (*x509.Certificate, error) {
	if host == "" {
		return nil, fmt.Errorf("%w: no host name", ErrInvalidCSR)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCSR, err)
	}
	if len(csr.Raw) != len(csrDER) {
		return nil, fmt.Errorf("%w: trailing data after the request", ErrInvalidCSR)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCSR, err)
	}
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return nil, fmt.Errorf("%w: ECDSA keys are P-256 or P-384", ErrInvalidCSR)
		}
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return nil, fmt.Errorf("%w: RSA keys have at least 2048 bits, this one %d", ErrInvalidCSR, k.N.BitLen())
		}
	default:
		return nil, fmt.Errorf("%w: the key is %T, not ECDSA or RSA", ErrInvalidCSR, csr.PublicKey)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := c.now()
	notAfter := now.Add(HostValidity)
	if notAfter.After(c.cert.NotAfter) {
		notAfter = c.cert.NotAfter
	}
	template := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: host, Organization: []string{HostOrganization}},
		NotBefore:    now.Add(-backdate),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		// Neither a CA nor a server: the agent only calls.
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, c.cert, csr.PublicKey, c.key)
	if err != nil {
		return nil, fmt.Errorf("signing host certificate: %w", err)
	}
	return x509.ParseCertificate(der)
}
