package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/citest"
)

// swtpmProfile is what swtpm_setup 0.7 puts in its EK certificates.
var swtpmProfile = EKProfile{Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20191023"}

type wantExt struct {
	critical bool
	value    []byte // nil: not compared
}

func TestIssueEK(t *testing.T) {
	env := newEnv(t)
	c := env.open(t, Options{})
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)

	tests := []struct {
		name     string
		pub      crypto.PublicKey
		profile  EKProfile
		usage    x509.KeyUsage
		family   string
		level    int
		revision int
	}{
		{"rsa-2048", &rsaKey().PublicKey, swtpmProfile, x509.KeyUsageKeyEncipherment, "2.0", 0, 164},
		{"p-256", &p256.PublicKey, swtpmProfile, x509.KeyUsageKeyAgreement, "2.0", 0, 164},
		{"p-384", &p384.PublicKey, swtpmProfile, x509.KeyUsageKeyAgreement, "2.0", 0, 164},
		{"tpm 1.2", &rsaKey().PublicKey, EKProfile{Manufacturer: "id:00001014", Model: "swtpm", Version: "id:00000001", TPMVersion: "1.2"},
			x509.KeyUsageKeyEncipherment, "1.2", 2, 116},
		{"explicit revision", &p256.PublicKey, EKProfile{Manufacturer: "Vendor GmbH", Model: "vTPM ünïcode", Version: "1.2.3", SpecRevision: 183},
			x509.KeyUsageKeyAgreement, "2.0", 0, 183},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			der, err := c.IssueEK(tt.pub, tt.profile)
			if err != nil {
				t.Fatalf("IssueEK: %v", err)
			}
			cert, got, err := VerifyEK(der, VerifyOptions{Roots: c.Pool(), CurrentTime: t0.Add(time.Hour)})
			if err != nil {
				t.Fatalf("VerifyEK: %v", err)
			}
			want := tt.profile
			want.TPMVersion, want.SpecRevision, want.NotAfter = tt.family, tt.revision, t0.AddDate(10, 0, 0)
			if got != want {
				t.Errorf("profile = %+v, want %+v", got, want)
			}

			if !bytes.Equal(cert.RawSubject, []byte{0x30, 0x00}) {
				t.Errorf("subject = %x, want empty", cert.RawSubject)
			}
			if cert.KeyUsage != tt.usage {
				t.Errorf("key usage = %v, want exactly %v", cert.KeyUsage, tt.usage)
			}
			if len(cert.ExtKeyUsage) != 0 || len(cert.UnknownExtKeyUsage) != 1 || !cert.UnknownExtKeyUsage[0].Equal(oidEKCertificate) {
				t.Errorf("EKU = %v %v, want exactly tcg-kp-EKCertificate", cert.ExtKeyUsage, cert.UnknownExtKeyUsage)
			}
			if !cert.BasicConstraintsValid || cert.IsCA {
				t.Error("basic constraints missing or CA:TRUE")
			}
			if !bytes.Equal(cert.AuthorityKeyId, c.Certificate().SubjectKeyId) {
				t.Errorf("authority key id %x, want the CA's %x", cert.AuthorityKeyId, c.Certificate().SubjectKeyId)
			}
			if cert.SerialNumber.Sign() <= 0 || len(cert.SerialNumber.Bytes()) != 16 {
				t.Errorf("serial %x: want positive, 16 bytes", cert.SerialNumber)
			}
			if cert.SignatureAlgorithm != x509.ECDSAWithSHA384 || cert.Version != 3 {
				t.Errorf("signature %v, version %d", cert.SignatureAlgorithm, cert.Version)
			}
			if len(cert.DNSNames)+len(cert.EmailAddresses)+len(cert.IPAddresses)+len(cert.URIs) != 0 {
				t.Error("subject alt name has more than the directory name")
			}

			// Exactly these extensions, with this criticality, and the TCG
			// ones byte for byte.
			wantExts := map[string]wantExt{
				"2.5.29.17": {true, tpmSANForTest(t, tt.profile)},
				"2.5.29.9":  {false, tpmSpecForTest(t, tt.family, tt.level, tt.revision)},
				"2.5.29.37": {false, mustMarshal(t, []asn1.ObjectIdentifier{{2, 23, 133, 8, 1}})},
				"2.5.29.19": {true, []byte{0x30, 0x00}},
				"2.5.29.15": {true, nil},
				"2.5.29.35": {false, nil},
			}
			for _, ext := range cert.Extensions {
				w, ok := wantExts[ext.Id.String()]
				if !ok {
					t.Errorf("unexpected extension %v", ext.Id)
					continue
				}
				delete(wantExts, ext.Id.String())
				if ext.Critical != w.critical {
					t.Errorf("extension %v critical = %v, want %v", ext.Id, ext.Critical, w.critical)
				}
				if w.value != nil && !bytes.Equal(ext.Value, w.value) {
					t.Errorf("extension %v = %x, want %x", ext.Id, ext.Value, w.value)
				}
			}
			for id := range wantExts {
				t.Errorf("extension %s missing", id)
			}

			// What a verifier calling crypto/x509 itself must do.
			if _, err := cert.Verify(x509.VerifyOptions{
				Roots: c.Pool(), CurrentTime: t0.Add(time.Hour),
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
			}); err != nil {
				t.Errorf("Verify of the ParseEK certificate: %v", err)
			}
		})
	}
}

// tpmSANForTest builds the expected subjectAltName independently of
// marshalTPMSAN, from the profile's ASN.1 with explicit tags.
func tpmSANForTest(t *testing.T, p EKProfile) []byte {
	t.Helper()
	attr := func(oid asn1.ObjectIdentifier, v string) []byte {
		// SET { SEQUENCE { OID, UTF8String } }
		utf8 := append([]byte{0x0c, byte(len(v))}, v...)
		seq := append(mustMarshal(t, oid), utf8...)
		return tlv(0x31, tlv(0x30, seq))
	}
	name := tlv(0x30, slices.Concat(
		attr(asn1.ObjectIdentifier{2, 23, 133, 2, 1}, p.Manufacturer),
		attr(asn1.ObjectIdentifier{2, 23, 133, 2, 2}, p.Model),
		attr(asn1.ObjectIdentifier{2, 23, 133, 2, 3}, p.Version)))
	return tlv(0x30, tlv(0xa4, name))
}

func tpmSpecForTest(t *testing.T, family string, level, revision int) []byte {
	t.Helper()
	spec := tlv(0x30, slices.Concat(append([]byte{0x0c, byte(len(family))}, family...),
		mustMarshal(t, level), mustMarshal(t, revision)))
	return tlv(0x30, tlv(0x30, slices.Concat(mustMarshal(t, asn1.ObjectIdentifier{2, 23, 133, 2, 16}), tlv(0x31, spec))))
}

// tlv encodes a DER tag-length-value with a short length.
func tlv(tag byte, v []byte) []byte {
	if len(v) > 127 {
		panic("tlv: long form not needed by these tests")
	}
	return append([]byte{tag, byte(len(v))}, v...)
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := asn1.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// crypto/x509 alone refuses the certificate: the critical SAN holds only a
// directoryName, which it does not process. This is why ParseEK exists.
func TestPlainX509RefusesEK(t *testing.T) {
	c := newEnv(t).open(t, Options{})
	der, err := c.IssueEK(&rsaKey().PublicKey, swtpmProfile)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	_, err = cert.Verify(x509.VerifyOptions{Roots: c.Pool(), CurrentTime: t0, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if _, ok := err.(x509.UnhandledCriticalExtension); !ok {
		t.Fatalf("Verify without ParseEK = %v, want UnhandledCriticalExtension", err)
	}
	// And without ExtKeyUsageAny, the unknown EKU fails even after ParseEK.
	parsed, _, err := ParseEK(der)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parsed.Verify(x509.VerifyOptions{Roots: c.Pool(), CurrentTime: t0}); err == nil {
		t.Fatal("Verify with the default (serverAuth) key usage accepted an EK certificate")
	}
}

func TestVerifyEKRefuses(t *testing.T) {
	c := newEnv(t).open(t, Options{})
	other := newEnv(t).open(t, Options{})
	der, err := c.IssueEK(&rsaKey().PublicKey, swtpmProfile)
	if err != nil {
		t.Fatal(err)
	}
	ok := VerifyOptions{Roots: c.Pool(), CurrentTime: t0}
	if _, _, err := VerifyEK(der, ok); err != nil {
		t.Fatalf("VerifyEK: %v", err)
	}
	// A TLS-style certificate from the same CA: right issuer, not an EK.
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tls, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "host"}, DNSNames: []string{"host"},
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, c.Certificate(), &leafKey.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	// An EK certificate without the TCG EKU.
	san, _ := marshalTPMSAN(swtpmProfile)
	noEKU, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(8), NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour),
		ExtraExtensions: []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: san}},
	}, c.Certificate(), &leafKey.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}

	for _, tt := range []struct {
		name string
		der  []byte
		opts VerifyOptions
		want error // nil: any error
	}{
		{"other CA", der, VerifyOptions{Roots: other.Pool(), CurrentTime: t0}, nil},
		{"expired", der, VerifyOptions{Roots: c.Pool(), CurrentTime: t0.AddDate(11, 0, 0)}, nil},
		{"not yet valid", der, VerifyOptions{Roots: c.Pool(), CurrentTime: t0.Add(-time.Hour)}, nil},
		{"no roots", der, VerifyOptions{CurrentTime: t0}, nil},
		{"the CA itself", c.Certificate().Raw, ok, ErrNotEK},
		{"tls certificate", tls, ok, ErrNotEK},
		{"no EK usage", noEKU, ok, ErrNotEK},
		{"garbage", []byte("garbage"), ok, ErrNotEK},
		{"truncated", der[:len(der)-10], ok, ErrNotEK},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := VerifyEK(tt.der, tt.opts)
			if err == nil || tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("VerifyEK = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestIssueEKRefusesKey(t *testing.T) {
	c := newEnv(t).open(t, Options{})
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	xKey, _ := ecdh.X25519().GenerateKey(rand.Reader)
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	tpm12 := swtpmProfile
	tpm12.TPMVersion = "1.2"
	for _, tt := range []struct {
		name    string
		pub     crypto.PublicKey
		profile EKProfile
	}{
		{"nil", nil, swtpmProfile},
		{"ed25519", edPub, swtpmProfile},
		{"x25519", xKey.PublicKey(), swtpmProfile},
		{"rsa private key", rsaKey(), swtpmProfile},
		{"rsa value, not pointer", rsaKey().PublicKey, swtpmProfile},
		{"nil rsa pointer", (*rsa.PublicKey)(nil), swtpmProfile},
		{"rsa-1024", &small.PublicKey, swtpmProfile},
		{"p-224", &p224.PublicKey, swtpmProfile},
		{"ecc for tpm 1.2", &p256.PublicKey, tpm12},
	} {
		t.Run(tt.name, func(t *testing.T) {
			der, err := c.IssueEK(tt.pub, tt.profile)
			if !errors.Is(err, ErrUnsupportedKey) || der != nil {
				t.Fatalf("IssueEK = %d bytes, %v; want ErrUnsupportedKey", len(der), err)
			}
			t.Logf("error: %v", err)
		})
	}
}

func TestIssueEKRefusesProfile(t *testing.T) {
	c := newEnv(t).open(t, Options{})
	pub := &rsaKey().PublicKey
	with := func(f func(*EKProfile)) EKProfile { p := swtpmProfile; f(&p); return p }
	for _, tt := range []struct {
		name    string
		profile EKProfile
	}{
		{"no manufacturer", with(func(p *EKProfile) { p.Manufacturer = "" })},
		{"no model", with(func(p *EKProfile) { p.Model = "" })},
		{"no version", with(func(p *EKProfile) { p.Version = "" })},
		{"long model", with(func(p *EKProfile) { p.Model = strings.Repeat("m", 256) })},
		{"bad utf-8", with(func(p *EKProfile) { p.Model = "\xff" })},
		{"tpm 3.0", with(func(p *EKProfile) { p.TPMVersion = "3.0" })},
		{"tpm 2", with(func(p *EKProfile) { p.TPMVersion = "2" })},
		{"negative revision", with(func(p *EKProfile) { p.SpecRevision = -1 })},
		{"expired", with(func(p *EKProfile) { p.NotAfter = t0.Add(-time.Second) })},
		{"outlives CA", with(func(p *EKProfile) { p.NotAfter = t0.AddDate(20, 0, 0) })},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if der, err := c.IssueEK(pub, tt.profile); !errors.Is(err, ErrInvalidProfile) {
				t.Fatalf("IssueEK = %d bytes, %v; want ErrInvalidProfile", len(der), err)
			}
		})
	}
}

func TestEKValidity(t *testing.T) {
	env := newEnv(t)
	c := env.open(t, Options{})
	pub := &rsaKey().PublicKey

	explicit := swtpmProfile
	explicit.NotAfter = t0.AddDate(1, 0, 0)
	der, err := c.IssueEK(pub, explicit)
	if err != nil {
		t.Fatal(err)
	}
	if _, p, _ := ParseEK(der); !p.NotAfter.Equal(explicit.NotAfter) {
		t.Errorf("NotAfter = %v, want %v", p.NotAfter, explicit.NotAfter)
	}

	// Nine years on, the default ten years is cut to the CA's expiry.
	later := env.open(t, Options{Now: fixedClock(t0.AddDate(9, 0, 0))})
	der, err = later.IssueEK(pub, swtpmProfile)
	if err != nil {
		t.Fatal(err)
	}
	if _, p, _ := ParseEK(der); !p.NotAfter.Equal(c.Certificate().NotAfter) {
		t.Errorf("NotAfter = %v, want the CA's %v", p.NotAfter, c.Certificate().NotAfter)
	}
}

func TestSerialsAreRandom(t *testing.T) {
	c := newEnv(t).open(t, Options{})
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	seen := map[string]bool{}
	for range 50 {
		der, err := c.IssueEK(&key.PublicKey, swtpmProfile)
		if err != nil {
			t.Fatal(err)
		}
		cert, _, err := ParseEK(der)
		if err != nil {
			t.Fatal(err)
		}
		s := cert.SerialNumber.String()
		if seen[s] || len(cert.SerialNumber.Bytes()) != 16 {
			t.Fatalf("serial %x repeated or not 16 bytes", cert.SerialNumber)
		}
		seen[s] = true
	}
}

// ParseEK reads other layouts real TPM vendors use: all three attributes
// in one multi-valued RDN, PrintableString values, extra attributes.
func TestParseEKVendorLayouts(t *testing.T) {
	c := newEnv(t).open(t, Options{})
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	name := pkix.RDNSequence{{
		{Type: asn1.ObjectIdentifier{2, 5, 4, 3}, Value: "ignored"},
		{Type: oidTPMManufacturer, Value: "id:49465800"}, // PrintableString
		{Type: oidTPMModel, Value: "SLB9670"},
		{Type: oidTPMVersion, Value: "id:000D0009"},
	}}
	nameDER := mustMarshal(t, name)
	san := mustMarshal(t, []asn1.RawValue{
		{Class: asn1.ClassContextSpecific, Tag: 2, Bytes: []byte("dns.example")},
		{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: nameDER},
	})
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(1), NotBefore: t0, NotAfter: t0.Add(time.Hour),
		ExtraExtensions: []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: san}},
	}, c.Certificate(), &key.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	_, p, err := ParseEK(der)
	if err != nil {
		t.Fatal(err)
	}
	want := EKProfile{Manufacturer: "id:49465800", Model: "SLB9670", Version: "id:000D0009", NotAfter: t0.Add(time.Hour)}
	if p != want {
		t.Errorf("ParseEK = %+v, want %+v", p, want)
	}

	// The same attribute twice is ambiguous: refuse.
	dup := mustMarshal(t, pkix.RDNSequence{
		{{Type: oidTPMManufacturer, Value: "a"}}, {{Type: oidTPMManufacturer, Value: "b"}},
		{{Type: oidTPMModel, Value: "m"}}, {{Type: oidTPMVersion, Value: "v"}},
	})
	san = mustMarshal(t, []asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: dup}})
	der, err = x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), NotBefore: t0, NotAfter: t0.Add(time.Hour),
		ExtraExtensions: []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: san}},
	}, c.Certificate(), &key.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ParseEK(der); !errors.Is(err, ErrNotEK) {
		t.Errorf("ParseEK with a repeated manufacturer = %v, want ErrNotEK", err)
	}
}

// requireTool returns the path of an external program, skipping the test
// when it is missing, except under CI=true, where a skip would hide that
// the check never ran.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		citest.Missing(t, "%s not found (install swtpm-tools and openssl): %v", name, err)
	}
	return path
}

// swtpm_cert is what libvirt's swtpm_setup uses to certify EKs: ParseEK
// must read its certificates, and IssueEK must write the TCG extensions
// byte for byte as it does (only the key usage of ECC keys differs:
// swtpm sets keyEncipherment, the profile keyAgreement).
func TestInteropWithSwtpmCert(t *testing.T) {
	swtpmCert := requireTool(t, "swtpm_cert")
	dir := t.TempDir()

	// A throwaway issuer: swtpm_cert needs its key in a file, which the
	// deployment CA's key must never be.
	issuerKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	issuerTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "interop test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	issuerDER, err := x509.CreateCertificate(rand.Reader, issuerTmpl, issuerTmpl, &issuerKey.PublicKey, issuerKey)
	if err != nil {
		t.Fatal(err)
	}
	issuer, _ := x509.ParseCertificate(issuerDER)
	sec1, _ := x509.MarshalECPrivateKey(issuerKey)
	writePEM(t, filepath.Join(dir, "issuer.key"), "EC PRIVATE KEY", sec1)
	writePEM(t, filepath.Join(dir, "issuer.pem"), "CERTIFICATE", issuerDER)
	pool := x509.NewCertPool()
	pool.AddCert(issuer)

	c := newEnv(t).open(t, Options{})
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, tt := range []struct {
		name     string
		pub      crypto.PublicKey
		tpm12    bool
		specArgs []string
	}{
		{"rsa-2048", &rsaKey().PublicKey, false, []string{"2.0", "0", "164"}},
		{"p-256", &p256.PublicKey, false, []string{"2.0", "0", "164"}},
		{"tpm 1.2", &rsaKey().PublicKey, true, []string{"1.2", "2", "116"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			spki, err := x509.MarshalPKIXPublicKey(tt.pub)
			if err != nil {
				t.Fatal(err)
			}
			pubFile := filepath.Join(dir, tt.name+".pub")
			outFile := filepath.Join(dir, tt.name+".der")
			writePEM(t, pubFile, "PUBLIC KEY", spki)
			args := []string{"--type", "ek", "--pubkey", pubFile,
				"--signkey", filepath.Join(dir, "issuer.key"), "--issuercert", filepath.Join(dir, "issuer.pem"),
				"--out-cert", outFile, "--days", "1",
				"--tpm-manufacturer", swtpmProfile.Manufacturer, "--tpm-model", swtpmProfile.Model,
				"--tpm-version", swtpmProfile.Version,
				"--tpm-spec-family", tt.specArgs[0], "--tpm-spec-level", tt.specArgs[1], "--tpm-spec-revision", tt.specArgs[2]}
			profile := swtpmProfile
			if tt.tpm12 {
				profile.TPMVersion = "1.2"
			} else {
				args = append(args, "--tpm2")
			}
			if out, err := exec.Command(swtpmCert, args...).CombinedOutput(); err != nil {
				t.Fatalf("swtpm_cert: %v\n%s", err, out)
			}
			theirs, err := os.ReadFile(outFile)
			if err != nil {
				t.Fatal(err)
			}

			cert, got, err := ParseEK(theirs)
			if err != nil {
				t.Fatalf("ParseEK of swtpm's certificate: %v", err)
			}
			want := profile
			want.TPMVersion, want.SpecRevision, want.NotAfter = tt.specArgs[0], mustAtoi(t, tt.specArgs[2]), cert.NotAfter
			if got != want {
				t.Errorf("ParseEK = %+v, want %+v", got, want)
			}
			if !tt.tpm12 { // swtpm signs TPM 1.2 certificates with SHA-1, which crypto/x509 rejects
				if _, _, err := VerifyEK(theirs, VerifyOptions{Roots: pool}); err != nil {
					t.Errorf("VerifyEK of swtpm's certificate: %v", err)
				}
			}

			ours, err := c.IssueEK(tt.pub, profile)
			if err != nil {
				t.Fatal(err)
			}
			ourCert, _ := x509.ParseCertificate(ours)
			for _, oid := range []string{"2.5.29.17", "2.5.29.9", "2.5.29.37", "2.5.29.19"} {
				a, b := findExt(ourCert, oid), findExt(cert, oid)
				if a == nil || b == nil || a.Critical != b.Critical || !bytes.Equal(a.Value, b.Value) {
					t.Errorf("extension %s: ours %+v, swtpm's %+v", oid, a, b)
				}
			}
			if !bytes.Equal(ourCert.RawSubject, cert.RawSubject) {
				t.Errorf("subject: ours %x, swtpm's %x", ourCert.RawSubject, cert.RawSubject)
			}
		})
	}
}

// OpenSSL, an independent X.509 implementation, accepts the chain and
// reads the TCG directory name.
func TestOpenSSLVerifiesEK(t *testing.T) {
	openssl := requireTool(t, "openssl")
	c := newEnv(t).open(t, Options{Now: time.Now})
	dir := t.TempDir()
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for name, pub := range map[string]crypto.PublicKey{"rsa": &rsaKey().PublicKey, "ecc": &p256.PublicKey} {
		der, err := c.IssueEK(pub, swtpmProfile)
		if err != nil {
			t.Fatal(err)
		}
		ekFile := filepath.Join(dir, name+".pem")
		writePEM(t, ekFile, "CERTIFICATE", der)
		caFile := filepath.Join(dir, "ca.pem")
		os.WriteFile(caFile, c.ChainPEM(), 0o644)
		if out, err := exec.Command(openssl, "verify", "-x509_strict", "-CAfile", caFile, ekFile).CombinedOutput(); err != nil {
			t.Errorf("openssl verify %s: %v\n%s", name, err, out)
		}
		out, err := exec.Command(openssl, "x509", "-noout", "-text", "-in", ekFile).CombinedOutput()
		if err != nil {
			t.Fatalf("openssl x509: %v\n%s", err, out)
		}
		for _, want := range []string{
			"DirName:/2.23.133.2.1=id:00001014/2.23.133.2.2=swtpm/2.23.133.2.3=id:20191023",
			"X509v3 Subject Alternative Name: critical",
			"2.23.133.8.1",
			"CA:FALSE",
		} {
			if !strings.Contains(string(out), want) {
				t.Errorf("openssl x509 -text of %s lacks %q:\n%s", name, want, out)
			}
		}
	}
}

func findExt(cert *x509.Certificate, oid string) *pkix.Extension {
	for i, e := range cert.Extensions {
		if e.Id.String() == oid {
			return &cert.Extensions[i]
		}
	}
	return nil
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	n, ok := new(big.Int).SetString(s, 10)
	if !ok {
		t.Fatalf("not a number: %q", s)
	}
	return int(n.Int64())
}
