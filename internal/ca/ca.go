// Package ca is the deployment certificate authority that certifies the
// endorsement keys of vtpmd's vTPMs, so a tenant or verifier can tell a
// vTPM this deployment made from any other key.
//
// The CA is a self-signed ECDSA P-384 root. New makes one; MarshalPEM and
// Load carry it to and from storage, which is the caller's: vtpmd seals it
// in its store under the deployment's master key (internal/keyring), so
// every server replica holds the same CA and its key is never in
// plaintext on disk.
//
// EK certificates follow the X.509 EK certificate profile of the TCG EK
// Credential Profile for TPM Family 2.0, and the same shape with the TPM
// 1.2 values of the TCG Credential Profiles for TPM Family 1.2. Their TCG
// extensions match swtpm_cert's byte for byte (tested). See IssueEK for the
// exact contents and VerifyEK for what a verifier has to do that
// crypto/x509 alone does not.
package ca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"time"
)

const (
	commonName   = "vtpmd deployment CA"
	validityYear = 10
	// backdate absorbs clock skew between the host that issues a
	// certificate and the one that checks it minutes later.
	backdate = 5 * time.Minute
)

// Options configure New and Load.
type Options struct {
	// CommonName is the CN of the CA's subject. Used only by New.
	// Default: "vtpmd deployment CA".
	CommonName string
	// Organization is the O= of the CA's subject. Used only by New; a
	// loaded CA keeps its subject. Default: none.
	Organization string
	// Now is the clock for validity periods. Default: time.Now.
	Now func() time.Time
}

// CA is a deployment CA. It is safe for concurrent use.
type CA struct {
	cert     *x509.Certificate
	key      *ecdsa.PrivateKey
	chainPEM []byte
	now      func() time.Time
}

// Load parses a CA that MarshalPEM wrote: its certificate and its
// PKCS#8 private key, PEM. Anything else, or a key that is not the
// certificate's, is ErrDamaged: never replaced by a new CA, because every
// certificate already issued chains to this one.
func Load(pemBytes []byte, opts Options) (*CA, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	certBlock, rest := pem.Decode(pemBytes)
	if certBlock == nil || certBlock.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%w: no PEM certificate first", ErrDamaged)
	}
	keyBlock, rest := pem.Decode(rest)
	if keyBlock == nil || keyBlock.Type != "PRIVATE KEY" || len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%w: not a certificate and a private key, PEM", ErrDamaged)
	}
	cert, err := x509.ParseCertificate(certBlock.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: parsing the certificate: %w", ErrDamaged, err)
	}
	parsed, err := x509.ParsePKCS8PrivateKey(keyBlock.Bytes)
	if err != nil {
		// The parse error could quote key bytes; keep it out of the message.
		return nil, fmt.Errorf("%w: the private key is not PKCS#8", ErrDamaged)
	}
	key, ok := parsed.(*ecdsa.PrivateKey)
	if !ok || !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%w: the private key is not the certificate's", ErrDamaged)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("%w: the certificate is not a CA's", ErrDamaged)
	}
	return newCA(cert, key, opts.Now), nil
}

// MarshalPEM encodes the CA for Load: its certificate, then its PKCS#8
// private key, PEM. The result holds the key in the clear: seal it.
func (c *CA) MarshalPEM() ([]byte, error) {
	pkcs8, err := x509.MarshalPKCS8PrivateKey(c.key)
	if err != nil {
		return nil, fmt.Errorf("encoding ca key: %w", err)
	}
	defer clear(pkcs8)
	return append(bytes.Clone(c.chainPEM), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8})...), nil
}

// New makes a CA: a self-signed root (ECDSA P-384, 10 years, subject CN
// opts.CommonName plus opts.Organization).
func New(opts Options) (*CA, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.CommonName == "" {
		opts.CommonName = commonName
	}
	key, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating ca key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := opts.Now()
	subject := pkix.Name{CommonName: opts.CommonName}
	if opts.Organization != "" {
		subject.Organization = []string{opts.Organization}
	}
	template := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.AddDate(validityYear, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		// No path length limit: intermediates may come later.
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("self-signing ca certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing new ca certificate: %w", err)
	}
	return newCA(cert, key, opts.Now), nil
}

func newCA(cert *x509.Certificate, key *ecdsa.PrivateKey, now func() time.Time) *CA {
	return &CA{
		cert:     cert,
		key:      key,
		chainPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
		now:      now,
	}
}

// Certificate returns the CA's root certificate. It is shared: do not
// modify it.
func (c *CA) Certificate() *x509.Certificate { return c.cert }

// ChainPEM returns the PEM of the chain from the issuing CA up to the
// root; today that is the root alone.
func (c *CA) ChainPEM() []byte { return bytes.Clone(c.chainPEM) }

// Pool returns a new pool holding the root, for VerifyEK and
// x509.VerifyOptions.Roots. Each call returns a fresh pool, so a caller
// adding to it cannot change what others trust.
func (c *CA) Pool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(c.cert)
	return pool
}

// randomSerial returns a random positive serial of exactly 16 bytes: the
// top bit is clear (positive, no padding byte) and the next one set (no
// shorter encoding), leaving 126 random bits (RFC 5280 4.1.2.2 asks for
// at most 20 bytes; CA/B rules ask for at least 64 random bits).
func randomSerial() (*big.Int, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("reading random serial: %w", err)
	}
	b[0] = b[0]&0x7f | 0x40
	return new(big.Int).SetBytes(b[:]), nil
}
