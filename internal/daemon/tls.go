package daemon

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
)

// tlsConfigs are the API's HTTPS configuration from the certificate and key
// files (offering HTTP/2 and HTTP/1.1), and how this process's own clients trust it: the certificate
// itself, under its first name (they connect over loopback).
func tlsConfigs(certFile, keyFile string) (serving, self *tls.Config, err error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, nil, err
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, nil, err
	}
	self = &tls.Config{RootCAs: x509.NewCertPool(), MinVersion: tls.VersionTLS12}
	self.RootCAs.AddCert(leaf)
	switch {
	case len(leaf.DNSNames) > 0:
		self.ServerName = leaf.DNSNames[0]
	case len(leaf.IPAddresses) > 0:
		self.ServerName = leaf.IPAddresses[0].String()
	default:
		return nil, nil, errors.New("the TLS certificate names no host (no DNS or IP subject alternative name)")
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"}}, self, nil
}
