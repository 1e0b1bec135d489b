// Package keystone is an OpenStack Identity (Keystone v3) client: the
// credentials the openstack CLI reads (clouds.yaml, OS_* variables), a
// Session that gets and renews a token with them and finds endpoints in its
// catalog, and a Validator that checks other callers' tokens for a service
// and caches the answers for a bounded time.
//
// Tokens and passwords never appear in errors, logs or String methods.
package keystone

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Token is a validated Keystone token: who it is for, its scope, roles and
// catalog. Value is the token itself (the X-Subject-Token); keep it out of
// logs.
type Token struct {
	Value     string
	ExpiresAt time.Time
	IssuedAt  time.Time
	User      Named
	// Project is the project the token is scoped to; ID "" when it is not
	// project scoped.
	Project Named
	// System is true for a token scoped to the whole system
	// (system_scope "all").
	System bool
	// Roles are the role names on the scope, implied roles included (an
	// admin's token lists admin, member and reader).
	Roles   []string
	Catalog []Service
}

// Named is a Keystone user or project.
type Named struct {
	ID       string
	Name     string
	DomainID string
}

// HasRole reports whether t carries role name.
func (t *Token) HasRole(name string) bool {
	for _, r := range t.Roles {
		if r == name {
			return true
		}
	}
	return false
}

// Service is one service of a token's catalog.
type Service struct {
	Type      string     `json:"type"`
	Name      string     `json:"name"`
	Endpoints []Endpoint `json:"endpoints"`
}

// Endpoint is one URL of a catalog service.
type Endpoint struct {
	Interface string `json:"interface"`
	RegionID  string `json:"region_id"`
	Region    string `json:"region"`
	URL       string `json:"url"`
}

// renewBefore is how long before a token expires the Session gets a new
// one, at most; a token with a shorter life is renewed at three quarters
// of it.
const renewBefore = 5 * time.Minute

// Session holds credentials and the token they last got. Token, Endpoint
// and ProjectID are safe for concurrent use; concurrent callers that find
// no usable token wait for one request to Keystone.
type Session struct {
	creds  Credentials
	base   string // the auth URL, ending in /v3
	client *http.Client
	now    func() time.Time

	mu     sync.Mutex
	tok    *Token
	flight *flight
}

type flight struct {
	done chan struct{}
	tok  *Token
	err  error
}

// NewSession returns a Session authenticating with c through client
// (http.DefaultClient's transport with a 30 s timeout when nil). It does
// not talk to Keystone until asked for a token.
func NewSession(c Credentials, client *http.Client) *Session {
	if client == nil {
		client = &http.Client{Timeout: 30 * time.Second}
	}
	return &Session{creds: c, base: v3URL(c.AuthURL), client: client, now: time.Now}
}

// SetClock makes s read the time from now; for tests.
func (s *Session) SetClock(now func() time.Time) { s.now = now }

// Credentials returns the credentials s authenticates with.
func (s *Session) Credentials() Credentials { return s.creds }

// v3URL is the identity v3 root of an auth URL written either way
// ("http://ks:5000" or "http://ks:5000/v3/").
func v3URL(u string) string {
	u = strings.TrimRight(u, "/")
	if !strings.HasSuffix(u, "/v3") {
		u += "/v3"
	}
	return u
}

// Token returns a valid token, getting a new one when there is none or the
// one held expires soon. Errors wrap ErrUnavailable, ErrBadCredentials or
// ErrIncomplete.
func (s *Session) Token(ctx context.Context) (string, error) {
	t, err := s.current(ctx)
	if err != nil {
		return "", err
	}
	return t.Value, nil
}

// ProjectID is the ID of the project the session's token is scoped to, or
// an error wrapping ErrNotProjectScoped.
func (s *Session) ProjectID(ctx context.Context) (string, error) {
	t, err := s.current(ctx)
	if err != nil {
		return "", err
	}
	if t.Project.ID == "" {
		return "", fmt.Errorf("%w: %s", ErrNotProjectScoped, s.creds)
	}
	return t.Project.ID, nil
}

// Endpoint is the URL of serviceType (e.g. "key-manager") from the
// session token's catalog, of the credentials' interface ("public" unless
// set) and region (any unless set). None wraps ErrNoEndpoint.
func (s *Session) Endpoint(ctx context.Context, serviceType string) (string, error) {
	t, err := s.current(ctx)
	if err != nil {
		return "", err
	}
	iface := s.creds.Interface
	if iface == "" {
		iface = "public"
	}
	for _, svc := range t.Catalog {
		if svc.Type != serviceType {
			continue
		}
		for _, ep := range svc.Endpoints {
			if ep.Interface != iface {
				continue
			}
			if r := s.creds.RegionName; r != "" && ep.RegionID != r && ep.Region != r {
				continue
			}
			return strings.TrimRight(ep.URL, "/"), nil
		}
	}
	region := s.creds.RegionName
	if region == "" {
		region = "any"
	}
	return "", fmt.Errorf("%w: service type %q, interface %s, region %s", ErrNoEndpoint, serviceType, iface, region)
}

// Invalidate drops the held token, so the next call gets a new one; for a
// caller whose request with it was refused with 401.
func (s *Session) Invalidate(value string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tok != nil && s.tok.Value == value {
		s.tok = nil
	}
}

// current returns the held token if it is not due for renewal, else waits
// for the one request that gets a new one.
func (s *Session) current(ctx context.Context) (*Token, error) {
	s.mu.Lock()
	if t := s.tok; t != nil && s.now().Before(renewAt(t)) {
		s.mu.Unlock()
		return t, nil
	}
	f := s.flight
	if f == nil {
		f = &flight{done: make(chan struct{})}
		s.flight = f
		// The request outlives a caller that gives up: the others wait
		// for it too.
		go s.fetch(context.WithoutCancel(ctx), f)
	}
	s.mu.Unlock()
	select {
	case <-f.done:
		return f.tok, f.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (s *Session) fetch(ctx context.Context, f *flight) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	f.tok, f.err = s.authenticate(ctx)
	s.mu.Lock()
	if f.err == nil {
		s.tok = f.tok
	}
	s.flight = nil
	s.mu.Unlock()
	close(f.done)
}

// renewAt is when a token is due for renewal.
func renewAt(t *Token) time.Time {
	life := t.ExpiresAt.Sub(t.IssuedAt)
	if before := life / 4; before < renewBefore {
		return t.ExpiresAt.Add(-before)
	}
	return t.ExpiresAt.Add(-renewBefore)
}

// authenticate is POST /v3/auth/tokens with the session's credentials.
func (s *Session) authenticate(ctx context.Context) (*Token, error) {
	if err := s.creds.Check(); err != nil {
		return nil, err
	}
	body, err := json.Marshal(map[string]any{"auth": authBody(s.creds)})
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.base+"/auth/tokens", bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrIncomplete, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrUnavailable, s.base, unwrapURL(err))
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusCreated || resp.StatusCode == http.StatusOK:
		return readToken(resp, resp.Header.Get("X-Subject-Token"))
	case resp.StatusCode >= 500:
		return nil, fmt.Errorf("%w: %s answered %s", ErrUnavailable, s.base, resp.Status)
	case resp.StatusCode == http.StatusNotFound && !strings.Contains(resp.Header.Get("Content-Type"), "json"):
		return nil, fmt.Errorf("%w: %s is not a Keystone v3 endpoint (%s)", ErrUnavailable, s.base, resp.Status)
	default:
		return nil, fmt.Errorf("%w: %s for %s: %s", ErrBadCredentials, resp.Status, s.creds, keystoneMessage(resp.Body))
	}
}

// unwrapURL drops *url.Error's "Post <url>:" prefix, which the caller's
// message already names.
func unwrapURL(err error) error {
	var ue interface{ Unwrap() error }
	if errors.As(err, &ue) && strings.HasPrefix(err.Error(), "Post ") {
		if inner := ue.Unwrap(); inner != nil {
			return inner
		}
	}
	return err
}

// authBody is the "auth" object of a token request.
func authBody(c Credentials) map[string]any {
	var identity map[string]any
	if c.Token != "" {
		identity = map[string]any{"methods": []string{"token"}, "token": map[string]any{"id": c.Token}}
	} else {
		user := map[string]any{"password": c.Password}
		if c.UserID != "" {
			user["id"] = c.UserID
		} else {
			user["name"] = c.Username
			user["domain"] = domain(c.UserDomainID, c.UserDomainName)
		}
		identity = map[string]any{"methods": []string{"password"}, "password": map[string]any{"user": user}}
	}
	auth := map[string]any{"identity": identity}
	switch {
	case c.SystemScope != "":
		auth["scope"] = map[string]any{"system": map[string]any{c.SystemScope: true}}
	case c.ProjectID != "":
		auth["scope"] = map[string]any{"project": map[string]any{"id": c.ProjectID}}
	case c.ProjectName != "":
		auth["scope"] = map[string]any{"project": map[string]any{
			"name": c.ProjectName, "domain": domain(c.ProjectDomainID, c.ProjectDomainName)}}
	}
	return auth
}

// domain names a domain by ID, else by name, else the default domain.
func domain(id, name string) map[string]string {
	switch {
	case id != "":
		return map[string]string{"id": id}
	case name != "":
		return map[string]string{"name": name}
	}
	return map[string]string{"id": "default"}
}

// tokenBody is the "token" object Keystone returns on issue and validation.
type tokenBody struct {
	Token struct {
		ExpiresAt time.Time `json:"expires_at"`
		IssuedAt  time.Time `json:"issued_at"`
		User      struct {
			ID     string `json:"id"`
			Name   string `json:"name"`
			Domain struct {
				ID string `json:"id"`
			} `json:"domain"`
		} `json:"user"`
		Project *struct {
			ID     string `json:"id"`
			Name   string `json:"name"`
			Domain struct {
				ID string `json:"id"`
			} `json:"domain"`
		} `json:"project"`
		System map[string]bool `json:"system"`
		Roles  []struct {
			Name string `json:"name"`
		} `json:"roles"`
		Catalog []Service `json:"catalog"`
	} `json:"token"`
}

// maxTokenBody bounds a token response: a catalog of a large cloud fits.
const maxTokenBody = 4 << 20

func readToken(resp *http.Response, value string) (*Token, error) {
	var b tokenBody
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxTokenBody)).Decode(&b); err != nil {
		return nil, fmt.Errorf("%w: reading the token: %w", ErrUnavailable, err)
	}
	if value == "" || b.Token.ExpiresAt.IsZero() {
		return nil, fmt.Errorf("%w: a token response without a token or expiry", ErrUnavailable)
	}
	t := &Token{
		Value:     value,
		ExpiresAt: b.Token.ExpiresAt,
		IssuedAt:  b.Token.IssuedAt,
		User:      Named{ID: b.Token.User.ID, Name: b.Token.User.Name, DomainID: b.Token.User.Domain.ID},
		System:    b.Token.System["all"],
		Catalog:   b.Token.Catalog,
	}
	if p := b.Token.Project; p != nil {
		t.Project = Named{ID: p.ID, Name: p.Name, DomainID: p.Domain.ID}
	}
	for _, r := range b.Token.Roles {
		t.Roles = append(t.Roles, r.Name)
	}
	return t, nil
}

// keystoneMessage is the message of a Keystone error body, {"error":
// {"message": …}}, or the start of the body.
func keystoneMessage(body io.Reader) string {
	data, _ := io.ReadAll(io.LimitReader(body, 4096))
	var e struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(data, &e) == nil && e.Error.Message != "" {
		return e.Error.Message
	}
	return strings.TrimSpace(string(data))
}
