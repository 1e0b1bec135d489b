package attest

import (
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"slices"
)

// oidSubjectAltName is the extension TPM EK certificates mark critical with
// only a directoryName (the TPM's manufacturer, model and version), which
// Go's parser does not read and so calls unhandled.
var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// VerifyEKCertificate checks that an EK certificate (DER) chains to roots
// and returns the EK it certifies. Vendors' intermediate CAs may be given
// among the roots. Extended key usages are not checked: TPM vendors
// disagree on them.
func VerifyEKCertificate(der []byte, roots *x509.CertPool) (crypto.PublicKey, error) {
	if roots == nil {
		return nil, errors.New("no EK certificate authority is configured")
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("EK certificate: %w", err)
	}
	cert.UnhandledCriticalExtensions = slices.DeleteFunc(cert.UnhandledCriticalExtensions,
		func(oid asn1.ObjectIdentifier) bool { return oid.Equal(oidSubjectAltName) })
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("EK certificate (serial %s, issuer %q): %w", cert.SerialNumber, cert.Issuer, err)
	}
	return cert.PublicKey, nil
}
