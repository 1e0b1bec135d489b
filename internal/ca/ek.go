package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"slices"
	"time"
	"unicode/utf8"
)

// Object identifiers from the ASN.1 module of the TCG EK Credential
// Profile (the same arcs serve the TPM 1.2 Credential Profiles).
var (
	oidTPMManufacturer  = asn1.ObjectIdentifier{2, 23, 133, 2, 1}  // tcg-at-tpmManufacturer
	oidTPMModel         = asn1.ObjectIdentifier{2, 23, 133, 2, 2}  // tcg-at-tpmModel
	oidTPMVersion       = asn1.ObjectIdentifier{2, 23, 133, 2, 3}  // tcg-at-tpmVersion
	oidTPMSpecification = asn1.ObjectIdentifier{2, 23, 133, 2, 16} // tcg-at-tpmSpecification
	oidEKCertificate    = asn1.ObjectIdentifier{2, 23, 133, 8, 1}  // tcg-kp-EKCertificate
	oidSubjectAltName   = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidSubjectDirAttrs  = asn1.ObjectIdentifier{2, 5, 29, 9}
)

const (
	directoryNameTag      = 4   // GeneralName directoryName [4]
	maxAttributeLen       = 255 // STRMAX of the profile's UTF8String attributes
	defaultEKValidityYear = 10
)

// TPM versions an EKProfile can name, and their TPMSpecification level and
// default revision: 2.0 level 0 revision 164 (what swtpm 0.7 with libtpms
// 0.9 reports), 1.2 level 2 revision 116.
const (
	TPM20 = "2.0"
	TPM12 = "1.2"
)

var specDefaults = map[string]struct{ level, revision int }{
	TPM20: {0, 164},
	TPM12: {2, 116},
}

// EKProfile is what an EK certificate says about the TPM it belongs to.
type EKProfile struct {
	Manufacturer string // TPMManufacturer, e.g. "id:00001014" (IBM, swtpm's TPM manufacturer)
	Model        string // TPMModel, e.g. "swtpm"
	Version      string // TPMVersion (firmware), e.g. "id:20191023"
	// TPMVersion is the TPMSpecification family: "2.0" or "1.2" (1.2 uses
	// the same profile shape with the 1.2 values). IssueEK: "" means "2.0".
	// ParseEK: "" if the certificate carries no TPMSpecification.
	TPMVersion string
	// SpecRevision is the TPMSpecification revision. IssueEK: 0 means the
	// default for TPMVersion (164 for 2.0, 116 for 1.2).
	SpecRevision int
	// NotAfter ends the certificate's validity. IssueEK: zero means 10
	// years, cut to the CA's own expiry.
	NotAfter time.Time
}

// IssueEK issues an EK certificate for pub, following the TCG EK Credential
// Profile for TPM Family 2.0 (for TPMVersion "1.2", the same shape with the
// 1.2 values). The DER it returns holds:
//
//   - version 3; a random positive 16-byte serial; signature ECDSA with
//     SHA-384 by the CA; issuer the CA's subject;
//   - validity from now (minus 5 minutes for clock skew) to p.NotAfter;
//   - an empty subject;
//   - subjectAltName, critical (the subject is empty, RFC 5280 4.2.1.6):
//     one directoryName of three RDNs, TPMManufacturer (2.23.133.2.1),
//     TPMModel (2.23.133.2.2) and TPMVersion (2.23.133.2.3), UTF8Strings;
//   - subjectDirectoryAttributes, not critical: TPMSpecification
//     (2.23.133.2.16) {family, level, revision};
//   - extKeyUsage, not critical: tcg-kp-EKCertificate (2.23.133.8.1);
//   - basicConstraints, critical: cA FALSE;
//   - keyUsage, critical: keyEncipherment for RSA, keyAgreement for ECC;
//   - authorityKeyIdentifier: the CA's subjectKeyIdentifier.
//
// pub must be an *rsa.PublicKey of 2048, 3072 or 4096 bits or an
// *ecdsa.PublicKey on P-256 or P-384 (the TCG EK templates); a TPM 1.2 EK
// is RSA-2048 only. Anything else gives ErrUnsupportedKey. The profile
// encodes RSA keys as rsaEncryption, as swtpm and TPM vendors do, also
// for 1.2 (whose profile names RSAES-OAEP).
func (c *CA) IssueEK(pub crypto.PublicKey, p EKProfile) ([]byte, error) {
	if p.TPMVersion == "" {
		p.TPMVersion = TPM20
	}
	spec, ok := specDefaults[p.TPMVersion]
	if !ok {
		return nil, fmt.Errorf("%w: tpm version %q, want %q or %q", ErrInvalidProfile, p.TPMVersion, TPM20, TPM12)
	}
	if p.SpecRevision < 0 {
		return nil, fmt.Errorf("%w: negative spec revision %d", ErrInvalidProfile, p.SpecRevision)
	}
	if p.SpecRevision == 0 {
		p.SpecRevision = spec.revision
	}
	for _, f := range []struct{ name, value string }{
		{"manufacturer", p.Manufacturer}, {"model", p.Model}, {"version", p.Version},
	} {
		if f.value == "" || len(f.value) > maxAttributeLen || !utf8.ValidString(f.value) {
			return nil, fmt.Errorf("%w: tpm %s %q: want 1 to %d bytes of UTF-8", ErrInvalidProfile, f.name, f.value, maxAttributeLen)
		}
	}
	keyUsage, err := ekKeyUsage(pub, p.TPMVersion)
	if err != nil {
		return nil, err
	}

	now := c.now()
	notBefore := now.Add(-backdate)
	notAfter := p.NotAfter
	if notAfter.IsZero() {
		notAfter = now.AddDate(defaultEKValidityYear, 0, 0)
		if notAfter.After(c.cert.NotAfter) {
			notAfter = c.cert.NotAfter
		}
	}
	if !notAfter.After(now) {
		return nil, fmt.Errorf("%w: not after %s is not after now (%s)", ErrInvalidProfile, notAfter.Format(time.RFC3339), now.Format(time.RFC3339))
	}
	// A certificate cannot be trusted longer than its issuer.
	if notAfter.After(c.cert.NotAfter) {
		return nil, fmt.Errorf("%w: not after %s is after the ca expires (%s)", ErrInvalidProfile, notAfter.Format(time.RFC3339), c.cert.NotAfter.Format(time.RFC3339))
	}

	san, err := marshalTPMSAN(p)
	if err != nil {
		return nil, err
	}
	sda, err := marshalTPMSpecification(p.TPMVersion, spec.level, p.SpecRevision)
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	template := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              keyUsage,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{oidEKCertificate},
		BasicConstraintsValid: true,
		IsCA:                  false,
		// crypto/x509 builds no subjectAltName of its own when one is in
		// ExtraExtensions, and takes the authorityKeyIdentifier from the CA.
		ExtraExtensions: []pkix.Extension{
			{Id: oidSubjectAltName, Critical: true, Value: san},
			{Id: oidSubjectDirAttrs, Critical: false, Value: sda},
		},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, c.cert, pub, c.key)
	if err != nil {
		return nil, fmt.Errorf("signing ek certificate: %w", err)
	}
	return der, nil
}

// ekKeyUsage checks pub and returns the key usage the profile gives it:
// an RSA EK decrypts (keyEncipherment); an ECC EK does ECDH
// (keyAgreement), as in TPM2_ActivateCredential's secret sharing.
func ekKeyUsage(pub crypto.PublicKey, tpmVersion string) (x509.KeyUsage, error) {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if k == nil || k.N == nil {
			return 0, fmt.Errorf("%w: nil rsa key", ErrUnsupportedKey)
		}
		bits := k.N.BitLen()
		if bits != 2048 && (tpmVersion == TPM12 || bits != 3072 && bits != 4096) {
			return 0, fmt.Errorf("%w: rsa-%d for tpm %s", ErrUnsupportedKey, bits, tpmVersion)
		}
		return x509.KeyUsageKeyEncipherment, nil
	case *ecdsa.PublicKey:
		if k == nil || k.Curve == nil {
			return 0, fmt.Errorf("%w: nil ecdsa key", ErrUnsupportedKey)
		}
		if tpmVersion == TPM12 {
			return 0, fmt.Errorf("%w: ecc key for tpm 1.2, which has only rsa eks", ErrUnsupportedKey)
		}
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return 0, fmt.Errorf("%w: ecdsa curve %s", ErrUnsupportedKey, k.Curve.Params().Name)
		}
		return x509.KeyUsageKeyAgreement, nil
	default:
		return 0, fmt.Errorf("%w: %T, want *rsa.PublicKey or *ecdsa.PublicKey", ErrUnsupportedKey, pub)
	}
}

// utf8Attribute is an AttributeTypeAndValue whose value is a UTF8String, as
// the profile requires (encoding/asn1 would pick PrintableString for
// "id:00001014").
type utf8Attribute struct {
	Type  asn1.ObjectIdentifier
	Value string `asn1:"utf8"`
}

// utf8RDNSET is a RelativeDistinguishedName; encoding/asn1 encodes slice
// types whose name ends in SET as SET OF.
type utf8RDNSET []utf8Attribute

// marshalTPMSAN encodes GeneralNames with one directoryName holding the
// three TPM attributes, each in its own RDN (as swtpm and TPM vendors do).
func marshalTPMSAN(p EKProfile) ([]byte, error) {
	name, err := asn1.Marshal([]utf8RDNSET{
		{{Type: oidTPMManufacturer, Value: p.Manufacturer}},
		{{Type: oidTPMModel, Value: p.Model}},
		{{Type: oidTPMVersion, Value: p.Version}},
	})
	if err != nil {
		return nil, fmt.Errorf("encoding tpm attributes: %w", err)
	}
	// directoryName is [4] EXPLICIT: Name is a CHOICE, which cannot be
	// tagged implicitly.
	san, err := asn1.Marshal([]asn1.RawValue{{
		Class: asn1.ClassContextSpecific, Tag: directoryNameTag, IsCompound: true, Bytes: name,
	}})
	if err != nil {
		return nil, fmt.Errorf("encoding subject alt name: %w", err)
	}
	return san, nil
}

// tpmSpecification is TPMSpecification ::= SEQUENCE { family UTF8String,
// level INTEGER, revision INTEGER }.
type tpmSpecification struct {
	Family   string `asn1:"utf8"`
	Level    int
	Revision int
}

// attribute is X.501 Attribute ::= SEQUENCE { type, values SET OF ANY }.
type attribute struct {
	Type   asn1.ObjectIdentifier
	Values []asn1.RawValue `asn1:"set"`
}

// marshalTPMSpecification encodes SubjectDirectoryAttributes ::= SEQUENCE
// OF Attribute, holding the one TPMSpecification attribute.
func marshalTPMSpecification(family string, level, revision int) ([]byte, error) {
	spec, err := asn1.Marshal(tpmSpecification{Family: family, Level: level, Revision: revision})
	if err != nil {
		return nil, fmt.Errorf("encoding tpm specification: %w", err)
	}
	sda, err := asn1.Marshal([]attribute{{Type: oidTPMSpecification, Values: []asn1.RawValue{{FullBytes: spec}}}})
	if err != nil {
		return nil, fmt.Errorf("encoding subject directory attributes: %w", err)
	}
	return sda, nil
}

// ParseEK parses an EK certificate and returns its profile fields.
//
// crypto/x509 leaves a critical subjectAltName that has only a
// directoryName in UnhandledCriticalExtensions, so the certificate would
// fail every Verify. ParseEK reads the TPM attributes from it and then
// removes it from UnhandledCriticalExtensions of the returned certificate:
// call Verify on that certificate, not on one from x509.ParseCertificate.
// Any other unhandled critical extension stays and still fails Verify.
//
// It accepts the attributes in any RDN layout and as UTF8String,
// PrintableString or IA5String, as TPM vendors' certificates vary. It
// fails with ErrNotEK if the certificate does not parse or any of the
// three attributes is missing or repeated.
func ParseEK(der []byte) (*x509.Certificate, EKProfile, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, EKProfile{}, fmt.Errorf("%w: %w", ErrNotEK, err)
	}
	var p EKProfile
	var haveSAN bool
	for _, ext := range cert.Extensions {
		switch {
		case ext.Id.Equal(oidSubjectAltName):
			if err := parseTPMSAN(ext.Value, &p); err != nil {
				return nil, EKProfile{}, err
			}
			haveSAN = true
		case ext.Id.Equal(oidSubjectDirAttrs):
			if err := parseTPMSpecification(ext.Value, &p); err != nil {
				return nil, EKProfile{}, err
			}
		}
	}
	if !haveSAN {
		return nil, EKProfile{}, fmt.Errorf("%w: no subject alt name", ErrNotEK)
	}
	cert.UnhandledCriticalExtensions = slices.DeleteFunc(cert.UnhandledCriticalExtensions,
		func(id asn1.ObjectIdentifier) bool { return id.Equal(oidSubjectAltName) })
	p.NotAfter = cert.NotAfter
	return cert, p, nil
}

func parseTPMSAN(der []byte, p *EKProfile) error {
	var names []asn1.RawValue
	if rest, err := asn1.Unmarshal(der, &names); err != nil || len(rest) != 0 {
		return fmt.Errorf("%w: malformed subject alt name", ErrNotEK)
	}
	found := map[string]*string{
		oidTPMManufacturer.String(): &p.Manufacturer,
		oidTPMModel.String():        &p.Model,
		oidTPMVersion.String():      &p.Version,
	}
	seen := map[string]bool{}
	for _, gn := range names {
		if gn.Class != asn1.ClassContextSpecific || gn.Tag != directoryNameTag {
			continue
		}
		var rdns pkix.RDNSequence
		if rest, err := asn1.Unmarshal(gn.Bytes, &rdns); err != nil || len(rest) != 0 {
			return fmt.Errorf("%w: malformed directory name in subject alt name", ErrNotEK)
		}
		for _, rdn := range rdns {
			for _, atv := range rdn {
				dst, ok := found[atv.Type.String()]
				if !ok {
					continue
				}
				s, ok := atv.Value.(string)
				if !ok || s == "" {
					return fmt.Errorf("%w: attribute %s is not a non-empty string", ErrNotEK, atv.Type)
				}
				if seen[atv.Type.String()] {
					return fmt.Errorf("%w: attribute %s repeated", ErrNotEK, atv.Type)
				}
				seen[atv.Type.String()] = true
				*dst = s
			}
		}
	}
	if len(seen) != len(found) {
		return fmt.Errorf("%w: subject alt name lacks tpm manufacturer, model or version", ErrNotEK)
	}
	return nil
}

// parseTPMSpecification fills TPMVersion and SpecRevision from a
// TPMSpecification attribute; other attributes are ignored.
func parseTPMSpecification(der []byte, p *EKProfile) error {
	var attrs []attribute
	if rest, err := asn1.Unmarshal(der, &attrs); err != nil || len(rest) != 0 {
		return fmt.Errorf("%w: malformed subject directory attributes", ErrNotEK)
	}
	for _, a := range attrs {
		if !a.Type.Equal(oidTPMSpecification) {
			continue
		}
		var spec tpmSpecification
		if len(a.Values) != 1 {
			return fmt.Errorf("%w: tpm specification has %d values, want 1", ErrNotEK, len(a.Values))
		}
		if rest, err := asn1.Unmarshal(a.Values[0].FullBytes, &spec); err != nil || len(rest) != 0 {
			return fmt.Errorf("%w: malformed tpm specification", ErrNotEK)
		}
		p.TPMVersion, p.SpecRevision = spec.Family, spec.Revision
	}
	return nil
}

// VerifyOptions are the trust inputs of VerifyEK.
type VerifyOptions struct {
	// Roots are the trusted CAs, e.g. CA.Pool(). Required: a nil pool would
	// make crypto/x509 trust the system roots.
	Roots *x509.CertPool
	// Intermediates are extra certificates that may complete the chain.
	Intermediates *x509.CertPool
	// CurrentTime is when validity is checked. Default: time.Now().
	CurrentTime time.Time
}

// VerifyEK checks that der is an EK certificate issued under opts.Roots
// and returns it with its profile. The checks, in order:
//
//  1. ParseEK succeeds: a certificate with a subjectAltName directoryName
//     holding TPM manufacturer, model and version (ErrNotEK otherwise).
//  2. Its extended key usage includes tcg-kp-EKCertificate (ErrNotEK).
//  3. It is not a CA certificate (ErrNotEK).
//  4. crypto/x509 verifies the chain to opts.Roots at opts.CurrentTime:
//     signatures, validity periods, CA constraints, and no unhandled
//     critical extension except the subjectAltName that step 1 handled.
//
// Step 4 passes KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
// because crypto/x509 does not know tcg-kp-EKCertificate and would
// otherwise require serverAuth; step 2 checks the EKU instead. A verifier
// that calls x509.Certificate.Verify itself must do the same, on the
// certificate returned by ParseEK.
func VerifyEK(der []byte, opts VerifyOptions) (*x509.Certificate, EKProfile, error) {
	if opts.Roots == nil {
		return nil, EKProfile{}, errors.New("verifying ek certificate: no roots")
	}
	cert, p, err := ParseEK(der)
	if err != nil {
		return nil, EKProfile{}, err
	}
	if !slices.ContainsFunc(cert.UnknownExtKeyUsage, oidEKCertificate.Equal) {
		return nil, EKProfile{}, fmt.Errorf("%w: extended key usage lacks tcg-kp-EKCertificate", ErrNotEK)
	}
	if cert.IsCA {
		return nil, EKProfile{}, fmt.Errorf("%w: certificate is a ca", ErrNotEK)
	}
	if _, err := cert.Verify(x509.VerifyOptions{
		Roots:         opts.Roots,
		Intermediates: opts.Intermediates,
		CurrentTime:   opts.CurrentTime,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return nil, EKProfile{}, fmt.Errorf("verifying ek certificate chain: %w", err)
	}
	return cert, p, nil
}

// IssueVTPMEK certifies the EK of a vTPM of TPM version tpmVersion (TPM20
// or TPM12) with the manufacturer, model and version swtpm_setup uses, so
// tools that accept swtpm's own certificates accept these.
func (c *CA) IssueVTPMEK(pub crypto.PublicKey, tpmVersion string) ([]byte, error) {
	return c.IssueEK(pub, EKProfile{Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20191023", TPMVersion: tpmVersion})
}
