package keystone

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"
)

// Validate asks Keystone about another caller's token (GET
// /v3/auth/tokens?nocatalog, the token in X-Subject-Token, the session's
// own in X-Auth-Token); the Token it returns has no catalog. A token
// Keystone does not accept (malformed, expired, revoked) wraps
// ErrInvalidToken; Keystone unreachable or failing, or refusing the
// session's own credentials, wraps ErrUnavailable.
func (s *Session) Validate(ctx context.Context, subject string) (*Token, error) {
	for attempt := 0; ; attempt++ {
		own, err := s.Token(ctx)
		if err != nil {
			return nil, fmt.Errorf("%w: the service's own token: %w", ErrUnavailable, err)
		}
		// nocatalog: the caller's catalog is not needed, and is most of
		// the answer.
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.base+"/auth/tokens?nocatalog", nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Accept", "application/json")
		req.Header.Set("X-Auth-Token", own)
		req.Header.Set("X-Subject-Token", subject)
		resp, err := s.client.Do(req)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrUnavailable, s.base, unwrapURL(err))
		}
		switch {
		case resp.StatusCode == http.StatusOK:
			defer resp.Body.Close()
			return readToken(resp, subject)
		case resp.StatusCode == http.StatusNotFound:
			resp.Body.Close()
			return nil, ErrInvalidToken
		case resp.StatusCode == http.StatusUnauthorized && attempt == 0:
			// The service's own token was revoked or its keys rotated:
			// get a new one, once.
			resp.Body.Close()
			s.Invalidate(own)
			continue
		case resp.StatusCode >= 500:
			resp.Body.Close()
			return nil, fmt.Errorf("%w: validating a token: %s answered %s", ErrUnavailable, s.base, resp.Status)
		default:
			// 401 again, 403: the service user may not validate tokens.
			defer resp.Body.Close()
			return nil, fmt.Errorf("%w: validating a token as %s: %s: %s", ErrUnavailable, s.creds, resp.Status, keystoneMessage(resp.Body))
		}
	}
}

// ValidatorOptions tunes a Validator's cache.
type ValidatorOptions struct {
	// TTL is the longest a validation is reused: a token revoked in
	// Keystone is refused at most TTL later. Never past the token's own
	// expiry. 60 s when 0; negative disables the cache.
	TTL time.Duration
	// NegativeTTL is how long a token Keystone refused is refused without
	// asking again. 5 s (at most TTL) when 0.
	NegativeTTL time.Duration
	// MaxEntries bounds the cache; when full, an arbitrary entry makes
	// room. 10000 when 0.
	MaxEntries int
	// Now is the clock; time.Now when nil.
	Now func() time.Time
}

// Validator checks callers' tokens with a Session and remembers the
// answers for a bounded time. Concurrent checks of one token wait for one
// request to Keystone. Tokens are kept only as SHA-256 digests.
type Validator struct {
	session *Session
	opts    ValidatorOptions

	mu       sync.Mutex
	entries  map[[32]byte]entry
	inflight map[[32]byte]*check
}

type entry struct {
	tok   *Token // nil: refused
	until time.Time
}

type check struct {
	done chan struct{}
	tok  *Token
	err  error
}

// NewValidator returns a Validator asking Keystone through s.
func NewValidator(s *Session, opts ValidatorOptions) *Validator {
	if opts.TTL == 0 {
		opts.TTL = time.Minute
	}
	if opts.NegativeTTL == 0 {
		opts.NegativeTTL = min(5*time.Second, max(opts.TTL, 0))
	}
	if opts.MaxEntries <= 0 {
		opts.MaxEntries = 10000
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Validator{session: s, opts: opts, entries: map[[32]byte]entry{}, inflight: map[[32]byte]*check{}}
}

// TTL is the bound on how long a revoked token is still accepted.
func (v *Validator) TTL() time.Duration { return max(v.opts.TTL, 0) }

// Validate returns the token's identity, from the cache or Keystone. Errors
// are Session.Validate's. The returned Token's Value is subject.
func (v *Validator) Validate(ctx context.Context, subject string) (*Token, error) {
	key := sha256.Sum256([]byte(subject))
	v.mu.Lock()
	if e, ok := v.entries[key]; ok {
		if v.opts.Now().Before(e.until) {
			v.mu.Unlock()
			if e.tok == nil {
				return nil, ErrInvalidToken
			}
			return e.tok, nil
		}
		delete(v.entries, key)
	}
	c := v.inflight[key]
	if c == nil {
		c = &check{done: make(chan struct{})}
		v.inflight[key] = c
		go v.run(context.WithoutCancel(ctx), key, subject, c)
	}
	v.mu.Unlock()
	select {
	case <-c.done:
		return c.tok, c.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (v *Validator) run(ctx context.Context, key [32]byte, subject string, c *check) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c.tok, c.err = v.session.Validate(ctx, subject)
	now := v.opts.Now()
	v.mu.Lock()
	defer v.mu.Unlock()
	delete(v.inflight, key)
	close(c.done)
	var e entry
	switch {
	case v.opts.TTL < 0:
		return
	case c.err == nil:
		e = entry{tok: c.tok, until: now.Add(v.opts.TTL)}
		if c.tok.ExpiresAt.Before(e.until) {
			e.until = c.tok.ExpiresAt
		}
	case errors.Is(c.err, ErrInvalidToken):
		e = entry{until: now.Add(v.opts.NegativeTTL)}
	default:
		return // Keystone unavailable: ask again next time
	}
	if len(v.entries) >= v.opts.MaxEntries {
		v.evict(now)
	}
	v.entries[key] = e
}

// evict makes room: every expired entry goes, or else one arbitrary one.
func (v *Validator) evict(now time.Time) {
	for k, e := range v.entries {
		if !now.Before(e.until) {
			delete(v.entries, k)
		}
	}
	for k := range v.entries {
		if len(v.entries) < v.opts.MaxEntries {
			return
		}
		delete(v.entries, k)
	}
}

// Revoke revokes token in Keystone at authURL (DELETE /v3/auth/tokens,
// the token in X-Auth-Token and X-Subject-Token both): a user ending their
// own token needs no one else's rights. A token Keystone no longer accepts
// (revoked, expired) is ended already. Keystone unreachable or failing
// wraps ErrUnavailable.
func Revoke(ctx context.Context, client *http.Client, authURL, token string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, v3URL(authURL)+"/auth/tokens", nil)
	if err != nil {
		return err
	}
	req.Header.Set("X-Auth-Token", token)
	req.Header.Set("X-Subject-Token", token)
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrUnavailable, v3URL(authURL), unwrapURL(err))
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusNoContent, http.StatusOK, http.StatusNotFound, http.StatusUnauthorized:
		return nil
	}
	return fmt.Errorf("%w: revoking a token: %s answered %s: %s", ErrUnavailable, v3URL(authURL), resp.Status, keystoneMessage(resp.Body))
}
