// Package enrol admits hosts' agents to the control plane and knows them
// afterwards. The steps, in order:
//
//  1. The operator asks for a join token for a host (JoinToken): 32 random
//     bytes, base64url, shown once and stored only as its SHA-256 with the
//     host and an expiry (DefaultTokenTTL; MinTokenTTL..MaxTokenTTL). A
//     host named for the first time is recorded with no heartbeat, so it
//     reads down and takes no vTPMs until its agent speaks.
//  2. The host's agent makes a key pair, keeps the private key and sends
//     the token with a certificate request (Enroll). The host CA
//     certifies the request's key as the host's client certificate
//     (ca.IssueHost), whose serial the store records, and the token is
//     gone: one enrolment per token. An unknown, used or expired token
//     gets one answer (ErrInvalidJoinToken's), so it tells nothing.
//  3. From then on the agent calls over mTLS with that certificate, and
//     every request is checked again (Authenticate): issued by the host
//     CA, valid now, and its serial recorded and not revoked (read from
//     the store at most every HonourFor, and again as soon as the host's
//     certificates are revoked). So Revoke stops a host's certificates at
//     once, and its unused tokens with them.
//
// Refusals are *refusal.Error.
package enrol

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// Join tokens' lifetimes: the default, and the bounds an operator may ask
// for.
const (
	DefaultTokenTTL = time.Hour
	MinTokenTTL     = time.Minute
	MaxTokenTTL     = 24 * time.Hour
)

// Config is what a Service works with.
type Config struct {
	Store *store.Store
	// HostCA is the deployment's host CA (ca.HostCommonName), which issues
	// hosts' client certificates.
	HostCA *ca.CA
	// Now is the clock of tokens' and certificates' validity; default
	// time.Now.
	Now func() time.Time
	// Log receives enrolments and revocations; nil: silent.
	Log *slog.Logger
	// BoundEnrolment decides whether host's agent, which sent agentToken
	// (its own TPM's attestation token, "" for none), may enrol, and
	// whether the enrolment is bound to that TPM (verifier.BoundEnrolment);
	// nil: every enrolment is unbound.
	BoundEnrolment func(ctx context.Context, host, agentToken string) (bound bool, err error)
}

// Service issues join tokens, enrols hosts and authenticates them.
type Service struct {
	cfg   Config
	roots *x509.CertPool

	mu       sync.Mutex
	honoured map[string]honoured // by serial (hex); see Authenticate
	sweepAt  int                 // prune honoured when it grows to this
}

// HonourFor bounds how long Authenticate honours a certificate it found
// honoured in the store without reading it again. A revocation ends it at
// once on the server that revoked and, on PostgreSQL, moments later on
// every other server sharing the database (the store's notifications);
// the bound is for a notification lost while a server's listener
// reconnects.
const HonourFor = 10 * time.Second

// honoured is a certificate found honoured: the certificate (DER), its
// host, and until when, unless changed (the host's certificates) closes
// first.
type honoured struct {
	raw     []byte
	host    string
	changed <-chan struct{}
	until   time.Time
}

// New returns a Service with cfg.
func New(cfg Config) *Service {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Service{cfg: cfg, roots: cfg.HostCA.Pool()}
}

var hostRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// ValidHost reports whether name can name a host: a letter or digit, then
// up to 62 letters, digits, '_', '.' and '-' (a DNS name fits).
func ValidHost(name string) bool { return hostRE.MatchString(name) }

// ErrInvalidJoinToken is the one answer to a join token that is unknown,
// used or expired.
var ErrInvalidJoinToken = refusal.Unauthenticated(api.CodeInvalidJoinToken,
	"The join token is not valid: unknown, already used or expired. Ask the operator for a new one (vtpmctl host add).")

// errInvalidHostCertificate is the one answer to a host certificate that
// the host CA issued but that is not, or no longer, honoured.
var errInvalidHostCertificate = refusal.Unauthenticated(api.CodeInvalidHostCertificate,
	"The host certificate is revoked, expired or unknown; the host must enrol again with a new join token (vtpmctl host add).")

// JoinToken issues a one-time join token for host, valid for ttl (0:
// DefaultTokenTTL), recording host if it is new. Only the operator may
// (c unscoped). The token itself is returned once and kept nowhere.
func (s *Service) JoinToken(ctx context.Context, c tenant.Caller, host string, ttl time.Duration) (token string, expires time.Time, err error) {
	if c.Project != "" {
		return "", time.Time{}, refusal.Forbidden(api.CodeForbidden, "Hosts are the operator's: a project cannot add one.")
	}
	if !ValidHost(host) {
		return "", time.Time{}, refusal.Invalid(api.CodeInvalidHostName, "Host "+refusal.Quote(host)+" is not a valid host name: a letter or digit, then up to 62 letters, digits, '_', '.' and '-'.")
	}
	if ttl == 0 {
		ttl = DefaultTokenTTL
	}
	if ttl < MinTokenTTL || ttl > MaxTokenTTL {
		return "", time.Time{}, refusal.Invalid(api.CodeInvalidParameter, fmt.Sprintf("A join token lives from %s to %s, not %s.", MinTokenTTL, MaxTokenTTL, ttl))
	}
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", time.Time{}, fmt.Errorf("reading a random join token: %w", err)
	}
	token = base64.RawURLEncoding.EncodeToString(raw[:])
	expires = s.cfg.Now().Add(ttl).UTC()
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		added, err := tx.AddHost(host)
		if err != nil {
			return err
		}
		if added {
			if err := tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: store.HostKey(host), Action: "added",
				Detail: "known host; down until its agent enrols and reports"}); err != nil {
				return err
			}
		}
		// Expired tokens go when new ones come, so they cannot pile up.
		if err := tx.DeleteExpiredJoinTokens(s.cfg.Now()); err != nil {
			return err
		}
		if err := tx.PutJoinToken(tokenHash(token), host, expires); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: store.HostKey(host), Action: "join token issued",
			Detail: "expires " + expires.Format(time.RFC3339)})
	})
	if err != nil {
		return "", time.Time{}, err
	}
	s.cfg.Log.Info("join token issued", "host", host, "by", c.Actor, "expires", expires)
	return token, expires, nil
}

// Enrollment is what a host gets for its join token.
type Enrollment struct {
	Host        string
	Certificate *x509.Certificate
	// ChainPEM is the host CA's chain, up to its root.
	ChainPEM []byte
	// TPMBound says the host's registered TPM vouched for the enrolment.
	TPMBound bool
}

// Enroll takes a join token and certifies the key of csrDER (see
// ca.IssueHost) as the client certificate of the token's host; agentToken
// is the token the host's own TPM earned, "" for none (see
// Config.BoundEnrolment). A refused request (a bad token:
// ErrInvalidJoinToken; a bad CSR: invalid_csr; a host whose registered TPM
// did not vouch for it) changes nothing: the join token stays usable until
// it expires.
func (s *Service) Enroll(ctx context.Context, token string, csrDER []byte, agentToken string) (Enrollment, error) {
	var host string
	err := s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { host, err = tx.JoinTokenHost(tokenHash(token)); return err })
	if errors.Is(err, store.ErrNotFound) {
		return Enrollment{}, ErrInvalidJoinToken
	}
	if err != nil {
		return Enrollment{}, err
	}
	bound := false
	if s.cfg.BoundEnrolment != nil {
		if bound, err = s.cfg.BoundEnrolment(ctx, host, agentToken); err != nil {
			return Enrollment{}, err
		}
	}
	var e Enrollment
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		taken, expires, err := tx.TakeJoinToken(tokenHash(token))
		if errors.Is(err, store.ErrNotFound) || err == nil && taken != host {
			return ErrInvalidJoinToken
		}
		if err != nil {
			return err
		}
		if !s.cfg.Now().Before(expires) {
			return ErrInvalidJoinToken
		}
		note := ""
		if bound {
			note = ", enrolled with the agent token of the host's registered TPM"
		}
		cert, err := s.issue(tx, host, csrDER, "enrolled", note)
		if err != nil {
			return err
		}
		e = Enrollment{Host: host, Certificate: cert, ChainPEM: s.cfg.HostCA.ChainPEM(), TPMBound: bound}
		return nil
	})
	if err != nil {
		return Enrollment{}, err
	}
	s.cfg.Log.Info("host enrolled", "host", e.Host, "serial", serialHex(e.Certificate), "not_after", e.Certificate.NotAfter, "tpm_bound", bound)
	return e, nil
}

// Renew certifies the key of csrDER as host's next client certificate:
// the host's agent calls it, with its current certificate (authenticated
// by the caller), before that one expires. The old one stays valid until
// it expires or the host is revoked.
func (s *Service) Renew(ctx context.Context, host string, csrDER []byte) (Enrollment, error) {
	var e Enrollment
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		cert, err := s.issue(tx, host, csrDER, "renewed", "")
		if err != nil {
			return err
		}
		e = Enrollment{Host: host, Certificate: cert, ChainPEM: s.cfg.HostCA.ChainPEM()}
		return nil
	})
	if err != nil {
		return Enrollment{}, err
	}
	s.cfg.Log.Info("host certificate renewed", "host", host, "serial", serialHex(e.Certificate), "not_after", e.Certificate.NotAfter)
	return e, nil
}

// issue certifies the key of csrDER as host's client certificate in tx,
// records its serial and logs action (with note) as the host's event.
func (s *Service) issue(tx *store.Tx, host string, csrDER []byte, action, note string) (*x509.Certificate, error) {
	cert, err := s.cfg.HostCA.IssueHost(csrDER, host)
	if errors.Is(err, ca.ErrInvalidCSR) {
		return nil, refusal.Invalid(api.CodeInvalidCSR, "The certificate request is refused: "+refusal.Truncate(err.Error())+".")
	}
	if err != nil {
		return nil, err
	}
	if err := tx.PutHostCertificate(store.HostCertificate{Serial: serialHex(cert), Host: host, NotAfter: cert.NotAfter}); err != nil {
		return nil, err
	}
	err = tx.AppendEvent(store.Event{Actor: "agent:" + host, InstanceID: store.HostKey(host), Action: action,
		Detail: "host certificate " + serialHex(cert) + " until " + cert.NotAfter.UTC().Format(time.RFC3339) + note})
	return cert, err
}

// Issued reports whether leaf is signed by the host CA, valid now and for
// client authentication: a host's certificate, honoured or not. The TLS
// server trusts tenants' CAs too; this tells the two apart.
func (s *Service) Issued(leaf *x509.Certificate) bool {
	_, err := leaf.Verify(x509.VerifyOptions{Roots: s.roots, CurrentTime: s.cfg.Now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	return err == nil
}

// Authenticate names the host whose client certificate leaf is, checking
// on every call:
//
//  1. the host CA issued it, it is valid now and for client
//     authentication (Issued), and its subject is O=ca.HostOrganization;
//  2. its serial is recorded, for the host its CN names, and not revoked:
//     read from the store, or found so less than HonourFor ago with no
//     revocation of the host's certificates committed since (in this
//     process, or notified by another on the same PostgreSQL database).
//
// The same certificate (byte for byte) found honoured less than HonourFor
// ago, and not expired since, passes 1 as it did then: its signature is
// not verified again on each of its host's requests.
//
// A certificate of another CA is refused as forbidden (its holder is
// someone, but no host); a host certificate that fails 2 as
// unauthenticated.
func (s *Service) Authenticate(ctx context.Context, leaf *x509.Certificate) (host string, err error) {
	serial, now := serialHex(leaf), s.cfg.Now()
	if host, ok := s.known(leaf, serial, now); ok {
		return host, nil
	}
	if !s.Issued(leaf) || len(leaf.Subject.Organization) != 1 || leaf.Subject.Organization[0] != ca.HostOrganization {
		return "", refusal.Forbidden(api.CodeForbidden, "This is a host's route: it takes the client certificate the host's agent got at enrolment, not this one.")
	}
	// Listen before reading, so that a revocation between the two is not
	// missed.
	changed := s.cfg.Store.HostCertificatesChanged(leaf.Subject.CommonName)
	var rec *store.HostCertificate
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) {
		rec, err = tx.GetHostCertificate(serial)
		return err
	})
	if errors.Is(err, store.ErrNotFound) {
		return "", errInvalidHostCertificate
	}
	if err != nil {
		return "", err
	}
	if !rec.RevokedAt.IsZero() || rec.Host != leaf.Subject.CommonName {
		return "", errInvalidHostCertificate
	}
	s.honour(serial, honoured{raw: leaf.Raw, host: rec.Host, changed: changed, until: now.Add(HonourFor)})
	return rec.Host, nil
}

// known names the host of leaf, of serial, if Authenticate found that
// very certificate honoured less than HonourFor before now, it has not
// expired since, and its host's certificates have not changed since.
func (s *Service) known(leaf *x509.Certificate, serial string, now time.Time) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h, ok := s.honoured[serial]
	if !ok || !bytes.Equal(h.raw, leaf.Raw) || now.After(leaf.NotAfter) || !h.fresh(now) {
		return "", false
	}
	return h.host, true
}

func (h honoured) fresh(now time.Time) bool {
	select {
	case <-h.changed:
		return false
	default:
		return now.Before(h.until)
	}
}

// honour remembers h for serial, dropping what is no longer fresh when
// there is much of it.
func (s *Service) honour(serial string, h honoured) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.honoured == nil {
		s.honoured = map[string]honoured{}
	}
	if len(s.honoured) >= s.sweepAt {
		for k, v := range s.honoured {
			if !v.fresh(h.until.Add(-HonourFor)) {
				delete(s.honoured, k)
			}
		}
		s.sweepAt = 2*len(s.honoured) + 64
	}
	s.honoured[serial] = h
}

// Revocation is what Revoke stopped.
type Revocation struct {
	Certificates int // host certificates revoked
	JoinTokens   int // unused join tokens deleted
}

// Revoke stops every certificate of host at once (the next request with
// one is refused) and deletes its unused join tokens; the host enrols
// again only with a new token. Only the operator may; an unknown host is
// not found. The host's vTPMs stay where they are.
func (s *Service) Revoke(ctx context.Context, c tenant.Caller, host string) (Revocation, error) {
	if c.Project != "" {
		return Revocation{}, refusal.Forbidden(api.CodeForbidden, "Hosts are the operator's: a project cannot revoke one.")
	}
	var r Revocation
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		if _, err := tx.GetHost(host); errors.Is(err, store.ErrNotFound) {
			return refusal.NotFound(api.CodeNotFound, "No such host.")
		} else if err != nil {
			return err
		}
		if r.Certificates, err = tx.RevokeHostCertificates(host); err != nil {
			return err
		}
		if r.JoinTokens, err = tx.DeleteJoinTokens(host); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: store.HostKey(host), Action: "revoked",
			Detail: fmt.Sprintf("%d host certificates revoked, %d unused join tokens deleted", r.Certificates, r.JoinTokens)})
	})
	if err != nil {
		return Revocation{}, err
	}
	s.cfg.Log.Info("host revoked", "host", host, "by", c.Actor, "certificates", r.Certificates, "join_tokens", r.JoinTokens)
	return r, nil
}

// tokenHash is how a join token is stored and looked up: its SHA-256, in
// hex. The lookup compares hashes of a 256-bit secret, so its timing
// tells nothing about any token.
func tokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

func serialHex(c *x509.Certificate) string { return hex.EncodeToString(c.SerialNumber.Bytes()) }
