// Package swtpmtest holds test helpers for code that runs real swtpm: the
// skip-or-fail rule for missing tools, state directories checked for leaked
// swtpm processes, throwaway EK certifiers, and manufactured, running vTPMs.
package swtpmtest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// Require skips the test when swtpm (and the named extra tools, such as
// "tpm2_pcrread") are not on PATH, except under CI=true, where a missing
// tool fails the test: a green CI must mean the real thing ran.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range append([]string{"swtpm"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			citest.Missing(t, "%s is not on PATH (scripts/deps.sh installs it)", tool)
			return
		}
	}
}

// Dir returns a new, empty directory for vTPMs, removed after the test. The
// path is short (unix socket paths are limited to 107 bytes). When the test
// ends, after the cleanups registered later, it fails the test if a swtpm
// process still serves anything under the directory.
func Dir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vtpm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		CheckNoProcesses(t, dir)
		os.RemoveAll(dir)
	})
	return dir
}

// CheckNoProcesses fails t if a swtpm process has a state directory under root.
// It allows a second for processes just killed to be reaped.
func CheckNoProcesses(t testing.TB, root string) {
	t.Helper()
	var leaked []string
	for deadline := time.Now().Add(time.Second); ; time.Sleep(20 * time.Millisecond) {
		leaked = Processes(root)
		if len(leaked) == 0 || time.Now().After(deadline) {
			break
		}
	}
	for _, l := range leaked {
		t.Errorf("swtpm process leaked: %s", l)
	}
}

// Processes lists "pid: cmdline" of the swtpm processes whose arguments
// name a path under root.
func Processes(root string) []string {
	return ProcessesWhere(func(_ string, cmdline []byte) bool { return bytes.Contains(cmdline, []byte(root+"/")) })
}

// ProcessesWhere lists "pid: cmdline" of the swtpm processes for which
// match (given the pid and the NUL-separated command line) holds.
func ProcessesWhere(match func(pid string, cmdline []byte) bool) []string {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	var found []string
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || len(b) == 0 {
			continue // gone, or a zombie
		}
		args := bytes.Split(bytes.TrimRight(b, "\x00"), []byte{0})
		pid := filepath.Base(filepath.Dir(p))
		if filepath.Base(string(args[0])) != "swtpm" || !match(pid, b) {
			continue
		}
		found = append(found, pid+": "+string(bytes.Join(args, []byte(" "))))
	}
	return found
}

// Secret returns a fresh vTPM secret in vtpmd's form: base64 text of 384
// random bytes.
func Secret(t testing.TB) []byte {
	t.Helper()
	b := make([]byte, 384)
	rand.Read(b)
	return []byte(base64.StdEncoding.EncodeToString(b))
}

// Instance returns an instance of version v in a fresh Dir with a fresh
// secret, after Require.
func Instance(t testing.TB, v spec.Version) swtpm.Instance {
	t.Helper()
	Require(t)
	return swtpm.Instance{Dir: filepath.Join(Dir(t), "vtpm"), Version: v, Secret: Secret(t)}
}

// CA is a throwaway self-signed EK issuer for tests.
type CA struct {
	Cert *x509.Certificate
	key  crypto.Signer

	mu     sync.Mutex
	issued map[string][]byte // by EK kind
}

// NewCA makes a CA with a fresh P-256 key.
func NewCA(t testing.TB) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "swtpmtest EK CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &CA{Cert: cert, key: key, issued: map[string][]byte{}}
}

// Certify is a swtpm.ManufactureOptions.Certify that issues an EK
// certificate for pub.
func (ca *CA) Certify(_ context.Context, kind swtpm.EKKind, pub crypto.PublicKey) ([]byte, error) {
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "EK " + string(kind)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageKeyEncipherment,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.key)
	if err != nil {
		return nil, err
	}
	ca.mu.Lock()
	ca.issued[string(kind)] = der
	ca.mu.Unlock()
	return der, nil
}

// Issued is the last certificate issued for kind.
func (ca *CA) Issued(kind swtpm.EKKind) []byte {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	return ca.issued[string(kind)]
}

// Manufactured returns a manufactured, stopped vTPM of version v with EK
// certificates from ca (nil: a fresh CA).
func Manufactured(t testing.TB, v spec.Version, ca *CA) (swtpm.Instance, *swtpm.Identity) {
	t.Helper()
	i := Instance(t, v)
	if ca == nil {
		ca = NewCA(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	id, err := swtpm.Manufacture(ctx, i, swtpm.ManufactureOptions{Certify: ca.Certify})
	if err != nil {
		t.Fatalf("manufacturing a %s vTPM: %v", v, err)
	}
	return i, id
}

// Start starts i and stops it when the test ends.
func Start(t testing.TB, i swtpm.Instance) *swtpm.Process {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := swtpm.Start(ctx, i, nil)
	if err != nil {
		t.Fatalf("starting swtpm: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Stop(ctx); err != nil {
			t.Errorf("stopping swtpm %s: %v", strconv.Itoa(p.Pid()), err)
		}
	})
	return p
}
