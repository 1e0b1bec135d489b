// Package barbican keeps vtpmd's secrets in OpenStack's key manager
// (Barbican, the Key Manager API v1), exactly as Nova keeps a vTPM's
// through castellan, so that either can read what the other stored:
//
//   - store: POST /v1/secrets with {"name": "vTPM secret for instance
//     <uuid>", "secret_type": "passphrase", "payload": base64 of the
//     payload, "payload_content_type": "application/octet-stream",
//     "payload_content_encoding": "base64"} (no algorithm, bit length,
//     mode or expiration); Barbican answers 201 with the secret_ref, whose
//     last path segment is the secret's UUID (Barbican chooses it);
//   - read: GET /v1/secrets/<uuid> (metadata, Accept: application/json),
//     then GET /v1/secrets/<uuid>/payload (Accept:
//     application/octet-stream), which answers the payload's raw bytes;
//   - delete: DELETE /v1/secrets/<uuid>, 204.
//
// Every request carries a Keystone token (X-Auth-Token): the caller's, if
// the context has one (keyring.WithToken), else vtpmd's own service
// identity's. Barbican scopes each secret to the project of the token that
// stored it: no other project reads it, not even with the admin role.
//
// A request that gets no answer, or a 5xx or 429, is tried again with
// backoff within Config.Budget; then the operation fails with
// keyring.ErrUnavailable. 401 and 403 are keyring.ErrForbidden, 404
// keyring.ErrNotFound.
package barbican

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keystone"
)

// Service is vtpmd's own identity in Keystone (a *keystone.Session): its
// token stores and reads the secrets the deployment holds, and lists them
// for the reclaim of orphans.
type Service interface {
	// Token returns a valid token of the service identity.
	Token(ctx context.Context) (string, error)
	// Invalidate drops a token Barbican refused with 401 (expired).
	Invalidate(token string)
	// Validate reads who a token is for: the service's own user ID is
	// how List tells vtpmd's secrets from other services' in a shared
	// service project.
	Validate(ctx context.Context, subject string) (*keystone.Token, error)
}

var _ Service = (*keystone.Session)(nil)

// Config is what a Keyring works with.
type Config struct {
	// URL is Barbican's endpoint (the Keystone catalog's key-manager
	// endpoint, or the operator's), with or without a trailing slash,
	// without /v1.
	URL string
	// Service is vtpmd's own identity.
	Service Service
	// Client sends the requests; nil: one with Go's default transport.
	// Each attempt is bounded by AttemptTimeout, whatever its timeout.
	Client *http.Client
	// Budget bounds one operation, retries included. Default 5s.
	Budget time.Duration
	// AttemptTimeout bounds one request. Default 2s.
	AttemptTimeout time.Duration
	// Log receives retries and cleanups, never a token or payload; nil:
	// silent.
	Log *slog.Logger
}

// Keyring is a keyring.Keyring on Barbican. It is safe for concurrent use.
type Keyring struct {
	cfg  Config
	base string // URL + "/v1/secrets"

	mu     sync.Mutex
	userID string // the service user's ID, once known
}

var (
	_ keyring.Keyring       = (*Keyring)(nil)
	_ keyring.CallerScoped  = (*Keyring)(nil)
	_ keyring.ServiceHolder = (*Keyring)(nil)
)

// New returns a Keyring on the Barbican at cfg.URL.
func New(cfg Config) (*Keyring, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("barbican url %q: want http(s)://host[:port]", cfg.URL)
	}
	if cfg.Service == nil {
		return nil, errors.New("barbican needs vtpmd's service credentials")
	}
	if cfg.Client == nil {
		cfg.Client = &http.Client{}
	}
	if cfg.Budget <= 0 {
		cfg.Budget = 5 * time.Second
	}
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = 2 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Keyring{cfg: cfg, base: strings.TrimSuffix(cfg.URL, "/") + "/v1/secrets"}, nil
}

// ScopedToCaller implements keyring.CallerScoped: Barbican keeps a secret
// in the project of the token that stored it.
func (k *Keyring) ScopedToCaller() bool { return true }

// createBody is castellan's store request for a Passphrase (observed on
// the wire from Nova's ensure_vtpm_secret).
type createBody struct {
	Name            string `json:"name,omitempty"`
	SecretType      string `json:"secret_type"`
	Payload         string `json:"payload"`
	ContentType     string `json:"payload_content_type"`
	ContentEncoding string `json:"payload_content_encoding"`
}

// meta is a secret's metadata as Barbican answers it.
type meta struct {
	Ref       string `json:"secret_ref"`
	Name      string `json:"name"`
	Status    string `json:"status"`
	Created   string `json:"created"`
	CreatorID string `json:"creator_id"`
}

// Create stores payload as a passphrase secret named name, as Nova does,
// with the caller's token if ctx has one, else the service's; project is
// checked but not sent: Barbican takes the project from the token. If an
// attempt whose outcome is unknown (no answer, or a 5xx) was retried, the
// secret it may have made is found by name and deleted, so that one secret
// is left.
func (k *Keyring) Create(ctx context.Context, project, name string, payload []byte) (string, error) {
	if err := keyring.CheckProject(project); err != nil {
		return "", err
	}
	if err := keyring.CheckPayload(payload); err != nil {
		return "", err
	}
	body, err := json.Marshal(createBody{Name: name, SecretType: "passphrase",
		Payload: base64.StdEncoding.EncodeToString(payload), ContentType: "application/octet-stream", ContentEncoding: "base64"})
	if err != nil {
		return "", err
	}
	began := time.Now()
	res, err := k.do(ctx, request{method: http.MethodPost, url: k.base, body: body, accept: "application/json"})
	if err != nil {
		return "", fmt.Errorf("storing secret in barbican: %w", err)
	}
	var m meta
	if err := json.Unmarshal(res.body, &m); err != nil {
		return "", fmt.Errorf("storing secret in barbican: %w: the answer does not parse", keyring.ErrUnavailable)
	}
	id, err := refID(m.Ref)
	if err != nil {
		return "", fmt.Errorf("storing secret in barbican: %w", err)
	}
	if res.uncertain && name != "" {
		k.dropDuplicates(ctx, name, id, began)
	}
	return id, nil
}

// dropDuplicates deletes the secrets named name other than keep that were
// made since began (by Barbican's clock, within a minute's skew): the ones
// a retried store made before its answer was lost. Failures are logged;
// the reclaim (deployment secrets) finds what is left.
func (k *Keyring) dropDuplicates(ctx context.Context, name, keep string, began time.Time) {
	q := url.Values{"name": {name}, "limit": {"100"}}
	var page struct {
		Secrets []meta `json:"secrets"`
	}
	res, err := k.do(ctx, request{method: http.MethodGet, url: k.base + "?" + q.Encode(), accept: "application/json"})
	if err == nil {
		err = json.Unmarshal(res.body, &page)
	}
	if err != nil {
		k.cfg.Log.Warn("looking for a duplicate secret after a retried store", "name", name, "err", err)
		return
	}
	for _, m := range page.Secrets {
		id, err := refID(m.Ref)
		if err != nil || id == keep || created(m.Created).Before(began.Add(-time.Minute)) {
			continue
		}
		if err := k.Delete(ctx, id); err != nil && !errors.Is(err, keyring.ErrNotFound) {
			k.cfg.Log.Warn("deleting a duplicate secret a retried store made", "secret", id, "err", err)
			continue
		}
		k.cfg.Log.Info("deleted a duplicate secret a retried store made", "secret", id, "kept", keep)
	}
}

// Get reads the secret id as castellan does: its metadata, then its
// payload. Project is "": the token that could read it is of its project.
func (k *Keyring) Get(ctx context.Context, id string) (keyring.Secret, error) {
	if !keyring.ValidID(id) {
		return keyring.Secret{}, fmt.Errorf("getting secret %q: %w", id, keyring.ErrInvalidID)
	}
	res, err := k.do(ctx, request{method: http.MethodGet, url: k.base + "/" + id, accept: "application/json"})
	if err != nil {
		return keyring.Secret{}, fmt.Errorf("getting secret %s: %w", id, err)
	}
	var m meta
	if err := json.Unmarshal(res.body, &m); err != nil {
		return keyring.Secret{}, fmt.Errorf("getting secret %s: %w: the metadata does not parse", id, keyring.ErrUnavailable)
	}
	res, err = k.do(ctx, request{method: http.MethodGet, url: k.base + "/" + id + "/payload", accept: "application/octet-stream"})
	if err != nil {
		return keyring.Secret{}, fmt.Errorf("getting secret %s: %w", id, err)
	}
	return keyring.Secret{ID: id, Payload: res.body, Created: created(m.Created)}, nil
}

// Delete deletes the secret id.
func (k *Keyring) Delete(ctx context.Context, id string) error {
	if !keyring.ValidID(id) {
		return fmt.Errorf("deleting secret %q: %w", id, keyring.ErrInvalidID)
	}
	if _, err := k.do(ctx, request{method: http.MethodDelete, url: k.base + "/" + id}); err != nil {
		return fmt.Errorf("deleting secret %s: %w", id, err)
	}
	return nil
}

// ServiceHolds implements keyring.ServiceHolder: as the service, it reads
// the secret's name and lists the service project's secrets of that name
// (no project lists another's), which include id only if the secret is
// the service project's and not read through an ACL.
func (k *Keyring) ServiceHolds(ctx context.Context, id string) (bool, error) {
	if !keyring.ValidID(id) {
		return false, fmt.Errorf("looking up secret %q: %w", id, keyring.ErrInvalidID)
	}
	ctx = keyring.AsService(ctx)
	res, err := k.do(ctx, request{method: http.MethodGet, url: k.base + "/" + id, accept: "application/json"})
	if err != nil {
		return false, fmt.Errorf("looking up secret %s: %w", id, err)
	}
	var m meta
	if err := json.Unmarshal(res.body, &m); err != nil {
		return false, fmt.Errorf("looking up secret %s: %w: the metadata does not parse", id, keyring.ErrUnavailable)
	}
	q := url.Values{"name": {m.Name}, "limit": {"100"}}
	if res, err = k.do(ctx, request{method: http.MethodGet, url: k.base + "?" + q.Encode(), accept: "application/json"}); err != nil {
		return false, fmt.Errorf("looking up secret %s: %w", id, err)
	}
	var page struct {
		Secrets []meta `json:"secrets"`
	}
	if err := json.Unmarshal(res.body, &page); err != nil {
		return false, fmt.Errorf("looking up secret %s: %w: the answer does not parse", id, keyring.ErrUnavailable)
	}
	for _, s := range page.Secrets {
		if got, err := refID(s.Ref); err == nil && got == id {
			return true, nil
		}
	}
	return false, nil
}

// List returns the IDs of the secrets vtpmd's service user made in its
// project, sorted by Barbican (creation). Secrets other users made there
// (Nova's deployment secrets, when it shares the service project) are not
// vtpmd's and are left out. A caller's secrets are not listed: no project
// lists another's.
func (k *Keyring) List(ctx context.Context) ([]string, error) {
	ctx = keyring.AsService(ctx)
	self, err := k.serviceUser(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing secrets: %w", err)
	}
	var ids []string
	for offset := 0; ; {
		q := url.Values{"limit": {"100"}, "offset": {strconv.Itoa(offset)}}
		res, err := k.do(ctx, request{method: http.MethodGet, url: k.base + "?" + q.Encode(), accept: "application/json"})
		if err != nil {
			return nil, fmt.Errorf("listing secrets: %w", err)
		}
		var page struct {
			Secrets []meta `json:"secrets"`
			Total   int    `json:"total"`
		}
		if err := json.Unmarshal(res.body, &page); err != nil {
			return nil, fmt.Errorf("listing secrets: %w: the answer does not parse", keyring.ErrUnavailable)
		}
		for _, m := range page.Secrets {
			if id, err := refID(m.Ref); err == nil && m.CreatorID == self {
				ids = append(ids, id)
			}
		}
		offset += len(page.Secrets)
		if len(page.Secrets) == 0 || offset >= page.Total {
			return ids, nil
		}
	}
}

// self is the service user's ID.
func (k *Keyring) serviceUser(ctx context.Context) (string, error) {
	k.mu.Lock()
	id := k.userID
	k.mu.Unlock()
	if id != "" {
		return id, nil
	}
	tok, err := k.cfg.Service.Token(ctx)
	if err != nil {
		return "", unavailable(err)
	}
	t, err := k.cfg.Service.Validate(ctx, tok)
	if err != nil {
		return "", unavailable(err)
	}
	k.mu.Lock()
	k.userID = t.User.ID
	k.mu.Unlock()
	return t.User.ID, nil
}

// unavailable wraps a Keystone failure: vtpmd cannot act as itself now.
// Keystone down, or too slow for the operation's budget, is the key
// manager unavailable; bad service credentials are not.
func unavailable(err error) error {
	if errors.Is(err, keystone.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: keystone: %w", keyring.ErrUnavailable, err)
	}
	return fmt.Errorf("vtpmd's service credentials: %w", err)
}

// refID is the UUID a secret_ref ends in.
func refID(ref string) (string, error) {
	id := ref[strings.LastIndexByte(ref, '/')+1:]
	if !keyring.ValidID(id) {
		return "", fmt.Errorf("%w: barbican answered secret_ref %q, which does not end in a uuid", keyring.ErrUnavailable, ref)
	}
	return id, nil
}

// created parses Barbican's timestamps (ISO 8601 in UTC, without a zone);
// the zero time if it cannot.
func created(s string) time.Time {
	for _, layout := range []string{"2006-01-02T15:04:05.999999", time.RFC3339Nano} {
		if t, err := time.ParseInLocation(layout, s, time.UTC); err == nil {
			return t.UTC()
		}
	}
	return time.Time{}
}

type request struct {
	method, url, accept string
	body                []byte
}

type response struct {
	body []byte
	// uncertain says an earlier attempt may have been carried out though
	// no success was seen (it went unanswered, or failed with a 5xx).
	uncertain bool
}

// do sends r as the caller (or the service), trying again with backoff
// while Barbican cannot answer, within Budget. A 2xx answer is returned;
// anything else is an error wrapping keyring.ErrUnavailable,
// ErrForbidden or ErrNotFound, or Barbican's refusal.
func (k *Keyring) do(ctx context.Context, r request) (*response, error) {
	ctx, cancel := context.WithTimeout(ctx, k.cfg.Budget)
	defer cancel()
	caller, asCaller := keyring.Token(ctx)
	out := &response{}
	wait := 100 * time.Millisecond
	var last error
	renewed := false
	for attempt := 1; ; attempt++ {
		token := caller
		if !asCaller {
			t, err := k.cfg.Service.Token(ctx)
			if err != nil {
				return nil, unavailable(err)
			}
			token = t
		}
		status, body, err := k.send(ctx, r, token)
		switch {
		case err == nil && status/100 == 2:
			out.body = body
			return out, nil
		case err == nil && status == http.StatusUnauthorized && !asCaller && !renewed:
			// The service's token expired early (revoked, Keystone's
			// keys rotated): once more with a new one.
			k.cfg.Service.Invalidate(token)
			renewed = true
			continue
		case err == nil && (status == http.StatusUnauthorized || status == http.StatusForbidden):
			return nil, fmt.Errorf("%w: %s", keyring.ErrForbidden, barbicanMessage(status, body))
		case err == nil && status == http.StatusNotFound:
			return nil, fmt.Errorf("%w: %s", keyring.ErrNotFound, barbicanMessage(status, body))
		case err == nil && status < 500 && status != http.StatusTooManyRequests:
			return nil, fmt.Errorf("barbican refused the request: %s", barbicanMessage(status, body))
		case err != nil && ctx.Err() != nil && context.Cause(ctx) != context.DeadlineExceeded:
			return nil, err // the caller gave up
		}
		if err != nil {
			last = err
			if !errors.Is(err, syscall.ECONNREFUSED) {
				out.uncertain = true
			}
		} else {
			last = errors.New(barbicanMessage(status, body))
			out.uncertain = out.uncertain || status >= 500
		}
		k.cfg.Log.Debug("barbican request failed; retrying", "method", r.method, "attempt", attempt, "err", last)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("%w: barbican at %s: %d attempts: %w", keyring.ErrUnavailable, k.cfg.URL, attempt, last)
		case <-t.C:
		}
		wait = min(2*wait, time.Second)
	}
}

// maxAnswer bounds what is read of an answer: a payload is at most
// keyring.MaxPayloadLen bytes, a listing of 100 secrets' metadata far less
// than this.
const maxAnswer = 1 << 20

// send makes one attempt.
func (k *Keyring) send(ctx context.Context, r request, token string) (int, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, k.cfg.AttemptTimeout)
	defer cancel()
	var body io.Reader
	if r.body != nil {
		body = bytes.NewReader(r.body)
	}
	req, err := http.NewRequestWithContext(ctx, r.method, r.url, body)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("X-Auth-Token", token)
	if r.body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if r.accept != "" {
		req.Header.Set("Accept", r.accept)
	}
	res, err := k.cfg.Client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, maxAnswer))
	if err != nil {
		return 0, nil, err
	}
	return res.StatusCode, b, nil
}

// barbicanMessage is Barbican's error answer, short: its status and the
// description it gives ({"title", "description", "code"}).
func barbicanMessage(status int, body []byte) string {
	var e struct {
		Title       string `json:"title"`
		Description string `json:"description"`
	}
	msg := http.StatusText(status)
	if json.Unmarshal(body, &e) == nil && e.Description != "" {
		msg = e.Description
	}
	return fmt.Sprintf("barbican answered %d: %s", status, msg)
}
