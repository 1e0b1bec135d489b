package daemon

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// servingCert is the API's certificate, read again from its files when
// they change, so a renewed certificate (cert-manager, certbot, a rotation
// script) is served without a restart. A renewal that does not load (the
// key not yet written, a mismatched pair) keeps the last good certificate
// and is logged; the next handshake tries again.
type servingCert struct {
	certFile, keyFile string
	log               *slog.Logger

	mu      sync.Mutex
	checked time.Time // when the files were last looked at
	stamp   [2]fileStamp
	cert    *tls.Certificate // with Leaf set
}

// fileStamp tells a file's versions apart without reading it.
type fileStamp struct {
	mod  time.Time
	size int64
}

// recheck bounds how often a handshake looks at the files.
const recheck = time.Second

// loadServingCert loads the pair once, failing if it does not load.
func loadServingCert(certFile, keyFile string, log *slog.Logger) (*servingCert, error) {
	c := &servingCert{certFile: certFile, keyFile: keyFile, log: log}
	stamp, err := c.stamps()
	if err != nil {
		return nil, err
	}
	if c.cert, err = loadPair(certFile, keyFile); err != nil {
		return nil, err
	}
	c.stamp, c.checked = stamp, time.Now()
	return c, nil
}

func (c *servingCert) stamps() ([2]fileStamp, error) {
	var s [2]fileStamp
	for i, f := range []string{c.certFile, c.keyFile} {
		fi, err := os.Stat(f)
		if err != nil {
			return s, err
		}
		s[i] = fileStamp{fi.ModTime(), fi.Size()}
	}
	return s, nil
}

// current returns the certificate to serve, reloading it if its files
// changed.
func (c *servingCert) current() *tls.Certificate {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.checked) < recheck {
		return c.cert
	}
	c.checked = time.Now()
	stamp, err := c.stamps()
	if err != nil || stamp == c.stamp {
		return c.cert
	}
	cert, err := loadPair(c.certFile, c.keyFile)
	if err != nil {
		c.log.Error("the renewed TLS certificate does not load; serving the previous one", "cert", c.certFile, "err", err)
		return c.cert
	}
	c.cert, c.stamp = cert, stamp
	c.log.Info("serving a renewed TLS certificate", "cert", c.certFile, "not_after", cert.Leaf.NotAfter)
	return c.cert
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
	c, err := loadServingCert(certFile, keyFile, log)
	if err != nil {
		return nil, nil, err
	}
	serving = &tls.Config{
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return c.current(), nil },
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"h2", "http/1.1"},
	}
	leaf := c.cert.Leaf
	self = &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The usual chain check cannot follow a renewal; pinning the
		// served certificate itself is stricter than it.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || !bytes.Equal(cs.PeerCertificates[0].Raw, c.current().Leaf.Raw) {
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
