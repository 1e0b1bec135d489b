package daemon

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/client"
)

// reloading is a value read from files (the API's certificate and key,
// the client CAs) and read again when they change, so a renewed
// certificate or a rotated CA (cert-manager, certbot, a rotation script)
// takes effect without a restart. Files that do not load (a key not yet
// written, a mismatched pair, a CA bundle half written) keep the last
// good value and are logged; the next handshake tries again.
type reloading[T any] struct {
	what  string // for the log: "TLS certificate", "client CAs"
	files []string
	load  func() (T, error)
	log   *slog.Logger

	mu      sync.Mutex
	checked time.Time // when the files were last looked at
	stamps  []fileStamp
	value   T
}

// fileStamp tells a file's versions apart without reading it.
type fileStamp struct {
	mod  time.Time
	size int64
}

// recheck bounds how often a handshake looks at the files.
const recheck = time.Second

// newReloading loads the value once, failing if it does not load.
func newReloading[T any](what string, files []string, load func() (T, error), log *slog.Logger) (*reloading[T], error) {
	r := &reloading[T]{what: what, files: files, load: load, log: log}
	stamps, err := r.stat()
	if err != nil {
		return nil, err
	}
	if r.value, err = load(); err != nil {
		return nil, err
	}
	r.stamps, r.checked = stamps, time.Now()
	return r, nil
}

func (r *reloading[T]) stat() ([]fileStamp, error) {
	s := make([]fileStamp, len(r.files))
	for i, f := range r.files {
		fi, err := os.Stat(f)
		if err != nil {
			return nil, err
		}
		s[i] = fileStamp{fi.ModTime(), fi.Size()}
	}
	return s, nil
}

// current returns the value, loading it again if its files changed.
func (r *reloading[T]) current() T {
	r.mu.Lock()
	defer r.mu.Unlock()
	if time.Since(r.checked) < recheck {
		return r.value
	}
	r.checked = time.Now()
	stamps, err := r.stat()
	if err != nil || slices.Equal(stamps, r.stamps) {
		return r.value
	}
	v, err := r.load()
	if err != nil {
		r.log.Error("the changed "+r.what+" do not load; keeping the previous", "files", r.files, "err", err)
		return r.value
	}
	r.value, r.stamps = v, stamps
	r.log.Info("loaded the changed "+r.what, "files", r.files)
	return r.value
}

func loadPair(certFile, keyFile string) (*tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	if cert.Leaf == nil {
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, err
		}
	}
	if len(cert.Leaf.DNSNames) == 0 && len(cert.Leaf.IPAddresses) == 0 {
		return nil, errors.New("the TLS certificate names no host (no DNS or IP subject alternative name)")
	}
	return &cert, nil
}

// tlsConfigs are the API's HTTPS configuration from the certificate and
// key files (offering HTTP/2 and HTTP/1.1, the certificate reloaded when
// renewed), and how this process's own clients trust it: exactly the
// certificate being served, under its first name (they connect over
// loopback, so the certificate need not come from a CA they know).
func tlsConfigs(certFile, keyFile string, log *slog.Logger) (serving, self *tls.Config, err error) {
	cert, err := newReloading("TLS certificate and key", []string{certFile, keyFile},
		func() (*tls.Certificate, error) { return loadPair(certFile, keyFile) }, log)
	if err != nil {
		return nil, nil, err
	}
	serving = &tls.Config{
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert.current(), nil },
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"h2", "http/1.1"},
	}
	leaf := cert.value.Leaf
	self = &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The usual chain check cannot follow a renewal; pinning the
		// served certificate itself is stricter than it.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || !bytes.Equal(cs.PeerCertificates[0].Raw, cert.current().Leaf.Raw) {
				return fmt.Errorf("the API at %s did not present this process's own certificate", cs.ServerName)
			}
			return nil
		},
	}
	switch {
	case len(leaf.DNSNames) > 0:
		self.ServerName = leaf.DNSNames[0]
	default:
		self.ServerName = leaf.IPAddresses[0].String()
	}
	return serving, self, nil
}

// verifyClients makes serving check the client certificates it is given
// against the hosts' CA and the CAs of the clientCA file, if named, which
// is read again when it changes: a rotated CA bundle takes effect without
// a restart.
func verifyClients(serving *tls.Config, clientCA string, hostCA *x509.Certificate, log *slog.Logger) error {
	serving.ClientAuth = tls.VerifyClientCertIfGiven
	if clientCA == "" {
		serving.ClientCAs = x509.NewCertPool()
		serving.ClientCAs.AddCert(hostCA)
		return nil
	}
	cas, err := newReloading("client CAs", []string{clientCA}, func() (*x509.CertPool, error) {
		pool, err := client.LoadCAs(clientCA)
		if err != nil {
			return nil, err
		}
		pool.AddCert(hostCA)
		return pool, nil
	}, log)
	if err != nil {
		return fmt.Errorf("client CAs: %w", err)
	}
	// Each handshake gets a copy of serving as it is now, with the current
	// CAs: a copy, as net/http goes on writing serving when it serves.
	base := serving.Clone()
	serving.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		c := base.Clone()
		c.ClientCAs = cas.current()
		return c, nil
	}
	return nil
}
