package ca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/keyring"
)

// t0 is the fixed clock of these tests.
var t0 = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }

// testEnv is a CA directory and the embedded keyring holding its key.
type testEnv struct {
	caDir, krDir string
	kr           *keyring.Embedded
}

func newEnv(t testing.TB) *testEnv {
	t.Helper()
	root := t.TempDir()
	env := &testEnv{caDir: filepath.Join(root, "ca"), krDir: filepath.Join(root, "keyring")}
	kr, err := keyring.OpenEmbedded(env.krDir)
	if err != nil {
		t.Fatalf("OpenEmbedded: %v", err)
	}
	env.kr = kr
	return env
}

func (env *testEnv) open(t testing.TB, opts Options) *CA {
	t.Helper()
	if opts.Now == nil {
		opts.Now = fixedClock(t0)
	}
	c, err := Open(context.Background(), env.caDir, env.kr, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { env.check(t, c) })
	return c
}

// check asserts the invariants of a committed CA directory: exactly
// ca.pem and ca.json, ca.json names the CA's key, and the keyring holds
// that key and nothing else of KeyProject.
func (env *testEnv) check(t testing.TB, c *CA) {
	t.Helper()
	entries, err := os.ReadDir(env.caDir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, []string{refFile, certFile}) {
		t.Errorf("ca dir holds %v, want [%s %s]", names, refFile, certFile)
	}
	var ref reference
	data, _ := os.ReadFile(filepath.Join(env.caDir, refFile))
	if err := json.Unmarshal(data, &ref); err != nil || ref.KeySecret != c.KeySecretID() {
		t.Errorf("%s = %s (%v); want key_secret %s", refFile, data, err, c.KeySecretID())
	}
	ids, _ := env.kr.List(context.Background())
	var system []string
	for _, id := range ids {
		if s, err := env.kr.Get(context.Background(), id); err == nil && s.Project == KeyProject {
			system = append(system, id)
		}
	}
	if !slices.Equal(system, []string{c.KeySecretID()}) {
		t.Errorf("keyring holds %s secrets %v, want only %s", KeyProject, system, c.KeySecretID())
	}
}

func TestOpenCreatesCA(t *testing.T) {
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
	onDisk, _ := os.ReadFile(filepath.Join(env.caDir, certFile))
	if !bytes.Equal(onDisk, c.ChainPEM()) {
		t.Error("ca.pem differs from ChainPEM")
	}
	for name, want := range map[string]os.FileMode{certFile: 0o644, refFile: 0o600} {
		if fi, err := os.Stat(filepath.Join(env.caDir, name)); err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: %v, want mode %#o", name, err, want)
		}
	}
}

func TestReopenGivesSameCA(t *testing.T) {
	env := newEnv(t)
	first := env.open(t, Options{Organization: "A"})

	// A new process: new keyring handle, different options and clock.
	kr2, err := keyring.OpenEmbedded(env.krDir)
	if err != nil {
		t.Fatal(err)
	}
	env2 := &testEnv{caDir: env.caDir, krDir: env.krDir, kr: kr2}
	second := env2.open(t, Options{Organization: "B", Now: fixedClock(t0.Add(24 * time.Hour))})

	if !bytes.Equal(first.Certificate().Raw, second.Certificate().Raw) || first.KeySecretID() != second.KeySecretID() {
		t.Fatal("reopening gave a different CA")
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

func TestCAKeyNeverInPlaintextOnDisk(t *testing.T) {
	env := newEnv(t)
	c := env.open(t, Options{})
	pkcs8, err := x509.MarshalPKCS8PrivateKey(c.key)
	if err != nil {
		t.Fatal(err)
	}
	sec1, err := x509.MarshalECPrivateKey(c.key)
	if err != nil {
		t.Fatal(err)
	}
	scalar, err := c.key.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	needles := [][]byte{
		scalar, scalar[:16], scalar[32:],
		pkcs8, sec1,
		[]byte(base64.StdEncoding.EncodeToString(pkcs8)[:48]),
		[]byte(base64.StdEncoding.EncodeToString(sec1)[:48]),
		[]byte("PRIVATE KEY"),
	}
	for _, dir := range []string{env.caDir, env.krDir} {
		err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			for _, n := range needles {
				if bytes.Contains(data, n) {
					t.Errorf("%s contains CA private key material", path)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// A crash after ca.pem but before ca.json leaves an uncommitted ca.pem;
// Open must discard it and make a complete CA.
func TestUncommittedCAIsRecreated(t *testing.T) {
	env := newEnv(t)
	if err := os.MkdirAll(env.caDir, 0o755); err != nil {
		t.Fatal(err)
	}
	stale := []byte("-----BEGIN CERTIFICATE-----\nleftover\n-----END CERTIFICATE-----\n")
	os.WriteFile(filepath.Join(env.caDir, certFile), stale, 0o644)
	os.WriteFile(filepath.Join(env.caDir, tmpPrefix+refFile+"-123"), []byte("{"), 0o600)
	c := env.open(t, Options{})
	if bytes.Equal(c.ChainPEM(), stale) {
		t.Fatal("stale ca.pem was kept")
	}
}

func TestFailedCreationLeavesNoCA(t *testing.T) {
	boom := errors.New("injected failure")
	t.Run("before commit", func(t *testing.T) {
		env := newEnv(t)
		testHookBeforeCommit = func() error { return boom }
		defer func() { testHookBeforeCommit = nil }()
		if _, err := Open(context.Background(), env.caDir, env.kr, Options{}); !errors.Is(err, boom) {
			t.Fatalf("Open = %v, want the injected failure", err)
		}
		env.assertNoCA(t)
		testHookBeforeCommit = nil
		env.open(t, Options{}) // and the next start succeeds
	})
	t.Run("keyring refuses", func(t *testing.T) {
		env := newEnv(t)
		_, err := Open(context.Background(), env.caDir, failingKeyring{env.kr, boom}, Options{})
		if !errors.Is(err, boom) {
			t.Fatalf("Open = %v, want the keyring's failure", err)
		}
		env.assertNoCA(t)
	})
	t.Run("context canceled", func(t *testing.T) {
		env := newEnv(t)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := Open(ctx, env.caDir, env.kr, Options{}); !errors.Is(err, context.Canceled) {
			t.Fatalf("Open = %v, want context.Canceled", err)
		}
		env.assertNoCA(t)
	})
}

func (env *testEnv) assertNoCA(t *testing.T) {
	t.Helper()
	if entries, _ := os.ReadDir(env.caDir); len(entries) != 0 {
		t.Errorf("failed creation left %v in the ca dir", entries)
	}
	if ids, _ := env.kr.List(context.Background()); len(ids) != 0 {
		t.Errorf("failed creation left secrets %v in the keyring", ids)
	}
}

// failingKeyring fails Create and Get with err.
type failingKeyring struct {
	keyring.Keyring
	err error
}

func (f failingKeyring) Create(context.Context, string, []byte) (string, error) { return "", f.err }
func (f failingKeyring) Get(context.Context, string) (keyring.Secret, error) {
	return keyring.Secret{}, f.err
}

// A committed CA that cannot be loaded is reported, never silently
// replaced: every EK certificate issued so far chains to it.
func TestDamagedCAIsReported(t *testing.T) {
	ctx := context.Background()
	otherKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	otherPKCS8, _ := x509.MarshalPKCS8PrivateKey(otherKey)
	tests := []struct {
		name   string
		damage func(t *testing.T, env *testEnv, c *CA)
		also   error
	}{
		{"ca.pem missing", func(t *testing.T, env *testEnv, c *CA) {
			os.Remove(filepath.Join(env.caDir, certFile))
		}, nil},
		{"ca.pem replaced", func(t *testing.T, env *testEnv, c *CA) {
			other := newEnv(t).open(t, Options{})
			os.WriteFile(filepath.Join(env.caDir, certFile), other.ChainPEM(), 0o644)
		}, nil},
		{"ca.json garbage", func(t *testing.T, env *testEnv, c *CA) {
			os.WriteFile(filepath.Join(env.caDir, refFile), []byte("{not json"), 0o600)
		}, nil},
		{"key deleted from keyring", func(t *testing.T, env *testEnv, c *CA) {
			if err := env.kr.Delete(ctx, c.KeySecretID()); err != nil {
				t.Fatal(err)
			}
		}, keyring.ErrNotFound},
		{"key of another project", func(t *testing.T, env *testEnv, c *CA) {
			id, _ := env.kr.Create(ctx, "tenant", otherPKCS8)
			rewriteRef(t, env, id)
		}, nil},
		{"another key", func(t *testing.T, env *testEnv, c *CA) {
			id, _ := env.kr.Create(ctx, KeyProject, otherPKCS8)
			rewriteRef(t, env, id)
		}, nil},
		{"not a key", func(t *testing.T, env *testEnv, c *CA) {
			id, _ := env.kr.Create(ctx, KeyProject, []byte("not a key"))
			rewriteRef(t, env, id)
		}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := newEnv(t)
			c, err := Open(ctx, env.caDir, env.kr, Options{})
			if err != nil {
				t.Fatal(err)
			}
			tt.damage(t, env, c)
			before := snapshot(t, env.caDir)
			_, err = Open(ctx, env.caDir, env.kr, Options{})
			if !errors.Is(err, ErrDamaged) || (tt.also != nil && !errors.Is(err, tt.also)) {
				t.Fatalf("Open = %v, want ErrDamaged (and %v)", err, tt.also)
			}
			t.Logf("error: %v", err)
			if after := snapshot(t, env.caDir); !slices.Equal(before, after) {
				t.Errorf("Open changed a damaged CA dir:\nbefore %v\nafter  %v", before, after)
			}
		})
	}
}

func rewriteRef(t *testing.T, env *testEnv, keyID string) {
	t.Helper()
	path := filepath.Join(env.caDir, refFile)
	data, _ := os.ReadFile(path)
	var ref reference
	if err := json.Unmarshal(data, &ref); err != nil {
		t.Fatal(err)
	}
	ref.KeySecret = keyID
	data, _ = json.Marshal(ref)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func snapshot(t *testing.T, dir string) []string {
	t.Helper()
	entries, _ := os.ReadDir(dir)
	var out []string
	for _, e := range entries {
		data, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		out = append(out, e.Name()+"="+string(data))
	}
	return out
}

// A keyring that is merely unreachable is not damage: the error must not
// say ErrDamaged, so the operator is not told to rebuild the CA.
func TestKeyringOutageIsNotDamage(t *testing.T) {
	env := newEnv(t)
	env.open(t, Options{})
	outage := errors.New("barbican: 503")
	_, err := Open(context.Background(), env.caDir, failingKeyring{env.kr, outage}, Options{})
	if !errors.Is(err, outage) || errors.Is(err, ErrDamaged) {
		t.Fatalf("Open = %v, want the outage and not ErrDamaged", err)
	}
}

func TestConcurrentFirstOpen(t *testing.T) {
	env := newEnv(t)
	const n = 8
	cas := make([]*CA, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			cas[i], errs[i] = Open(context.Background(), env.caDir, env.kr, Options{})
		})
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("Open %d: %v", i, errs[i])
		}
		if !bytes.Equal(cas[i].Certificate().Raw, cas[0].Certificate().Raw) {
			t.Fatalf("Open %d made a different CA", i)
		}
	}
	env.check(t, cas[0])
}

func TestOpenWithoutKeyring(t *testing.T) {
	if _, err := Open(context.Background(), t.TempDir(), nil, Options{}); err == nil {
		t.Fatal("Open without a keyring succeeded")
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
