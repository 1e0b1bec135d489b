package store

import "time"

// HostCertificate is a client certificate the host CA issued to a host's
// agent, as the store remembers it: enough to honour or refuse it.
type HostCertificate struct {
	Serial   string // lowercase hex
	Host     string
	NotAfter time.Time
	// RevokedAt is when the operator revoked it; zero while it is valid.
	RevokedAt time.Time
}

// AddHost records a host the operator named before its agent ever spoke:
// no backend, traits or capacity, and no heartbeat, so it reads down and
// takes nothing until its agent registers. A host already known is left
// as it is; added says whether this made it.
func (t *Tx) AddHost(name string) (added bool, err error) {
	res, err := t.exec(`INSERT INTO hosts (name, traits, capacity, backend, version, heartbeat_at) VALUES (?,'[]',0,'','','')
		ON CONFLICT(name) DO NOTHING`, name)
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

// PutJoinToken stores a join token for host by its SHA-256 (hex), valid
// until expires.
func (t *Tx) PutJoinToken(sha256Hex, host string, expires time.Time) error {
	_, err := t.exec(`INSERT INTO join_tokens (token_sha256, host, expires_at) VALUES (?,?,?)`, sha256Hex, host, stamp(expires))
	return err
}

// TakeJoinToken removes the join token whose SHA-256 (hex) is given and
// returns its host and expiry, so a token is used at most once, expired or
// JoinTokenHost names the host of an unused join token, without taking it;
// ErrNotFound if there is none (expired ones included).
func (t *Tx) JoinTokenHost(sha256Hex string) (string, error) {
	var host string
	err := t.queryRow(`SELECT host FROM join_tokens WHERE token_sha256=?`, sha256Hex).Scan(&host)
	return host, notFound(err)
}

// not; ErrNotFound if there is none.
func (t *Tx) TakeJoinToken(sha256Hex string) (host string, expires time.Time, err error) {
	var exp string
	err = t.queryRow(`SELECT host, expires_at FROM join_tokens WHERE token_sha256=?`, sha256Hex).Scan(&host, &exp)
	if err != nil {
		return "", time.Time{}, notFound(err)
	}
	// Counted: a concurrent taker that read the row too finds it gone.
	res, err := t.exec(`DELETE FROM join_tokens WHERE token_sha256=?`, sha256Hex)
	if err != nil {
		return "", time.Time{}, err
	}
	if n, err := res.RowsAffected(); err != nil {
		return "", time.Time{}, err
	} else if n != 1 {
		return "", time.Time{}, ErrNotFound
	}
	return host, parseStamp(exp), nil
}

// DeleteJoinTokens removes every join token of host and returns how
// many.
func (t *Tx) DeleteJoinTokens(host string) (int, error) {
	res, err := t.exec(`DELETE FROM join_tokens WHERE host=?`, host)
	if err != nil {
		return 0, err
	}
	n, err := res.RowsAffected()
	return int(n), err
}

// DeleteExpiredJoinTokens removes every join token that expired before
// now, whoever's.
func (t *Tx) DeleteExpiredJoinTokens(now time.Time) error {
	_, err := t.exec(`DELETE FROM join_tokens WHERE expires_at < ?`, stamp(now))
	return err
}

// PutHostCertificate records a certificate the host CA issued.
func (t *Tx) PutHostCertificate(c HostCertificate) error {
	_, err := t.exec(`INSERT INTO host_certificates (serial, host, not_after) VALUES (?,?,?)`, c.Serial, c.Host, stamp(c.NotAfter))
	return err
}

// GetHostCertificate reads the certificate of serial (hex); ErrNotFound
// if the host CA never issued it.
func (t *Tx) GetHostCertificate(serial string) (*HostCertificate, error) {
	var c HostCertificate
	var notAfter, revoked string
	err := t.queryRow(`SELECT serial, host, not_after, revoked_at FROM host_certificates WHERE serial=?`, serial).
		Scan(&c.Serial, &c.Host, &notAfter, &revoked)
	if err != nil {
		return nil, notFound(err)
	}
	c.NotAfter, c.RevokedAt = parseStamp(notAfter), parseStamp(revoked)
	return &c, nil
}

// RevokeHostCertificates revokes, as of now, every certificate of host
// not revoked before, and returns how many. The waiters on the host's
// certificates wake at the commit (HostCertificatesChanged).
func (t *Tx) RevokeHostCertificates(host string) (int, error) {
	res, err := t.exec(`UPDATE host_certificates SET revoked_at=? WHERE host=? AND revoked_at=''`, stamp(t.now), host)
	if err != nil {
		return 0, err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, err
	}
	if n > 0 {
		t.changed = append(t.changed, topic{kind: certificatesTopic, name: host})
	}
	return int(n), nil
}
