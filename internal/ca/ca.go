// Package ca is the deployment certificate authority that certifies the
// endorsement keys of vtpmd's vTPMs, so a tenant or verifier can tell a
// vTPM this deployment made from any other key.
//
// The CA is a self-signed ECDSA P-384 root. Its private key lives in the
// key manager (keyring project "vtpmd-system"), never in plaintext on disk;
// the CA directory holds only what may be public or is a mere reference:
//
//	ca.pem    the root certificate, PEM (mode 0644)
//	ca.json   {"version":1,"key_secret":"<keyring uuid>",
//	           "certificate_sha256":"<hex of the DER>"} (mode 0600)
//
// ca.json is written last and is the commit record: without it the
// directory holds no CA, whatever else is there.
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
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/keyring"
)

// KeyProject is the keyring project that owns the CA's private key; the
// daemon's drift detection should expect exactly one secret of it per CA.
const KeyProject = "vtpmd-system"

const (
	certFile     = "ca.pem"
	refFile      = "ca.json"
	refVersion   = 1
	commonName   = "vtpmd deployment CA"
	validityYear = 10
	tmpPrefix    = ".tmp-"
	// backdate absorbs clock skew between the host that issues a
	// certificate and the one that checks it minutes later.
	backdate = 5 * time.Minute
)

// Options configure Open.
type Options struct {
	// CommonName is the CN of the CA's subject. Used only when the CA is
	// created. Default: "vtpmd deployment CA".
	CommonName string
	// Organization is the O= of the CA's subject. Used only when the CA is
	// created; an existing CA keeps its subject. Default: none.
	Organization string
	// Now is the clock for validity periods. Default: time.Now.
	Now func() time.Time
}

// CA is an opened deployment CA. It is safe for concurrent use.
type CA struct {
	cert     *x509.Certificate
	key      *ecdsa.PrivateKey
	keyID    string
	chainPEM []byte
	now      func() time.Time
}

// reference is the content of ca.json.
type reference struct {
	Version           int    `json:"version"`
	KeySecret         string `json:"key_secret"`         // keyring UUID of the PKCS#8 DER private key
	CertificateSHA256 string `json:"certificate_sha256"` // hex SHA-256 of ca.pem's DER, so a swapped ca.pem is caught
}

// testHookBeforeCommit, when set, runs between storing the key and writing
// ca.json, so tests can fail creation at its most delicate point.
var testHookBeforeCommit func() error

// Open loads the deployment CA from dir, creating it on first start: a
// self-signed root (ECDSA P-384, 10 years, subject CN opts.CommonName
// plus opts.Organization) whose private key is stored in kr under
// project KeyProject. Reopening yields the same CA.
//
// Creation is crash-safe: ca.pem is written first, then the key is stored,
// then ca.json commits. A directory without ca.json holds no CA, so a
// leftover ca.pem is discarded and a new CA created. A failure during
// creation removes what it made; a crash between storing the key and
// writing ca.json can leave one unreferenced KeyProject secret in kr
// (harmless: it certified nothing that was ever committed). A committed
// CA that cannot be loaded is reported as ErrDamaged, never replaced.
// Concurrent Opens of one dir, also from other processes, are serialised
// by an advisory lock on dir.
func Open(ctx context.Context, dir string, kr keyring.Keyring, opts Options) (*CA, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if kr == nil {
		return nil, errors.New("opening ca: no keyring")
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.CommonName == "" {
		opts.CommonName = commonName
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating ca dir: %w", err)
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	// Temp files are only written under the lock, so any now are a
	// crash's leftovers (public data only).
	if entries, err := os.ReadDir(dir); err == nil {
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), tmpPrefix) {
				os.Remove(filepath.Join(dir, e.Name()))
			}
		}
	}

	data, err := os.ReadFile(filepath.Join(dir, refFile))
	switch {
	case err == nil:
		return load(ctx, dir, kr, data, opts)
	case errors.Is(err, fs.ErrNotExist):
		if err := os.Remove(filepath.Join(dir, certFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("removing uncommitted %s: %w", certFile, err)
		}
		return create(ctx, dir, kr, opts)
	default:
		return nil, fmt.Errorf("reading %s: %w", refFile, err)
	}
}

// lockDir takes an exclusive flock on dir itself, so no lock file is left
// behind and the lock dies with the process.
func lockDir(dir string) (unlock func(), err error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("opening ca dir: %w", err)
	}
	if err := syscall.Flock(int(d.Fd()), syscall.LOCK_EX); err != nil {
		d.Close()
		return nil, fmt.Errorf("locking ca dir: %w", err)
	}
	return func() { d.Close() }, nil // closing releases the flock
}

func load(ctx context.Context, dir string, kr keyring.Keyring, refJSON []byte, opts Options) (*CA, error) {
	var ref reference
	if err := json.Unmarshal(refJSON, &ref); err != nil {
		return nil, fmt.Errorf("%w: parsing %s: %w", ErrDamaged, refFile, err)
	}
	if ref.Version != refVersion {
		return nil, fmt.Errorf("%w: %s has version %d, want %d", ErrDamaged, refFile, ref.Version, refVersion)
	}
	if !keyring.ValidID(ref.KeySecret) {
		return nil, fmt.Errorf("%w: %s: key_secret %q is not a keyring id", ErrDamaged, refFile, ref.KeySecret)
	}

	pemBytes, err := os.ReadFile(filepath.Join(dir, certFile))
	if err != nil {
		return nil, fmt.Errorf("%w: reading %s: %w", ErrDamaged, certFile, err)
	}
	block, rest := pem.Decode(pemBytes)
	if block == nil || block.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%w: %s is not exactly one PEM certificate", ErrDamaged, certFile)
	}
	sum := sha256.Sum256(block.Bytes)
	if hex.EncodeToString(sum[:]) != ref.CertificateSHA256 {
		return nil, fmt.Errorf("%w: %s does not match the certificate_sha256 in %s", ErrDamaged, certFile, refFile)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: parsing %s: %w", ErrDamaged, certFile, err)
	}

	secret, err := kr.Get(ctx, ref.KeySecret)
	if errors.Is(err, keyring.ErrNotFound) {
		return nil, fmt.Errorf("%w: private key %s is missing from the keyring: %w", ErrDamaged, ref.KeySecret, err)
	}
	if err != nil {
		return nil, fmt.Errorf("loading ca private key %s: %w", ref.KeySecret, err)
	}
	defer clear(secret.Payload)
	if secret.Project != KeyProject {
		return nil, fmt.Errorf("%w: keyring secret %s belongs to project %q, not %q", ErrDamaged, ref.KeySecret, secret.Project, KeyProject)
	}
	parsed, err := x509.ParsePKCS8PrivateKey(secret.Payload)
	if err != nil {
		// The parse error could quote key bytes; keep it out of the message.
		return nil, fmt.Errorf("%w: keyring secret %s is not a PKCS#8 private key", ErrDamaged, ref.KeySecret)
	}
	key, ok := parsed.(*ecdsa.PrivateKey)
	if !ok || !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%w: keyring secret %s is not the private key of %s", ErrDamaged, ref.KeySecret, certFile)
	}
	return newCA(cert, key, ref.KeySecret, opts.Now), nil
}

func create(ctx context.Context, dir string, kr keyring.Keyring, opts Options) (ca *CA, err error) {
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

	// Undo on failure so that what is left is "no CA", as after a crash:
	// the certificate here, the key by keyring.CreateRecorded, which takes
	// it back when ca.json (the record that names it) cannot be written.
	defer func() {
		if err != nil {
			os.Remove(filepath.Join(dir, certFile))
		}
	}()

	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := writeFileAtomic(dir, certFile, pemBytes, 0o644); err != nil {
		return nil, fmt.Errorf("writing %s: %w", certFile, err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding ca key: %w", err)
	}
	sum := sha256.Sum256(der)
	keyID, err := keyring.CreateRecorded(ctx, kr, KeyProject, pkcs8, func(id string) error {
		if testHookBeforeCommit != nil {
			if err := testHookBeforeCommit(); err != nil {
				return err
			}
		}
		refJSON, err := json.MarshalIndent(reference{
			Version:           refVersion,
			KeySecret:         id,
			CertificateSHA256: hex.EncodeToString(sum[:]),
		}, "", "  ")
		if err != nil {
			return fmt.Errorf("encoding %s: %w", refFile, err)
		}
		if err := writeFileAtomic(dir, refFile, append(refJSON, '\n'), 0o600); err != nil {
			return fmt.Errorf("writing %s: %w", refFile, err)
		}
		return nil
	})
	clear(pkcs8)
	if err != nil {
		return nil, fmt.Errorf("storing ca key: %w", err)
	}
	return newCA(cert, key, keyID, opts.Now), nil
}

func newCA(cert *x509.Certificate, key *ecdsa.PrivateKey, keyID string, now func() time.Time) *CA {
	return &CA{
		cert:     cert,
		key:      key,
		keyID:    keyID,
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

// KeySecretID returns the keyring ID of the CA's private key, so drift
// detection can tell it from vTPM secrets.
func (c *CA) KeySecretID() string { return c.keyID }

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

// writeFileAtomic replaces dir/name with data crash-safely: temp file in
// dir, fsync, chmod, rename over the old name, fsync dir.
func writeFileAtomic(dir, name string, data []byte, perm os.FileMode) (err error) {
	f, err := os.CreateTemp(dir, tmpPrefix+name+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
