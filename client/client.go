// Package client is the Go client of vtpmd's REST API, used by vtpmctl and
// by programs that drive vtpmd.
package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/api"
)

// Client talks to one vtpmd server.
type Client struct {
	base    string
	http    *http.Client
	project string
	token   string // a registered attestation agent's bearer token
	// identity gives the Keystone token each request carries; nil: none.
	identity TokenSource
}

// TokenSource gives a valid Keystone token, renewing it when it must.
type TokenSource func(ctx context.Context) (string, error)

// New returns a client for the server at base: an http or https URL
// (http://127.0.0.1:8780), or unix:///PATH for the operator's local socket
// (vtpmd's <data-dir>/api.sock), where whoever can connect is the
// operator. A non-empty project scopes every request to that project.
func New(base, project string) *Client {
	c := &Client{base: strings.TrimRight(base, "/"), http: http.DefaultClient, project: project}
	if path, ok := strings.CutPrefix(base, "unix://"); ok {
		var d net.Dialer
		c.base = "http://vtpmd"
		c.http = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", path)
		}}}
	}
	return c
}

// WithAgentToken returns a copy of c that sends token, the bearer token a
// registered attestation agent got (Activate), as agents' calls need.
func (c *Client) WithAgentToken(token string) *Client {
	cc := *c
	cc.token = token
	return &cc
}

// WithIdentity returns a copy of c whose requests carry a Keystone token
// from src (in api.TokenHeader), for a vtpmd with Keystone
// authentication.
func (c *Client) WithIdentity(src TokenSource) *Client {
	cc := *c
	cc.identity = src
	return &cc
}

// WithTLS returns a copy of c whose HTTPS connections use cfg, e.g. to
// trust a deployment's private CA (LoadCAs).
func (c *Client) WithTLS(cfg *tls.Config) *Client {
	cc := *c
	t, ok := c.http.Transport.(*http.Transport)
	if !ok {
		t = http.DefaultTransport.(*http.Transport)
	}
	t = t.Clone()
	t.TLSClientConfig = cfg
	cc.http = &http.Client{Transport: t}
	return &cc
}

// LoadCAs reads a PEM file of CA certificates as a pool to trust.
func LoadCAs(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("%s holds no PEM certificate", path)
	}
	return pool, nil
}

// Error is an error response of the API: its HTTP status, and the stable
// code (one of api's Code constants) to match on.
type Error struct {
	Status  int
	Code    api.Code
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Message) }

// IdentityError is a request that was not sent because its Keystone
// token could not be had (WithIdentity): Keystone refused the
// credentials, or could not be reached.
type IdentityError struct{ Err error }

func (e *IdentityError) Error() string { return "getting a keystone token: " + e.Err.Error() }
func (e *IdentityError) Unwrap() error { return e.Err }

// ErrorCode is the API's code of err, an *Error (wrapped or not); "" when
// err is not an error response.
func ErrorCode(err error) api.Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

// IsNotFound reports whether err is a 404 from the API.
func IsNotFound(err error) bool { return hasStatus(err, http.StatusNotFound) }

// IsConflict reports whether err is the API's 409 (a duplicate instance,
// or an action the vTPM's phase does not allow).
func IsConflict(err error) bool { return hasStatus(err, http.StatusConflict) }

func hasStatus(err error, status int) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == status
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	_, err := c.send(ctx, method, path, nil, in, out)
	return err
}

// send makes one request with the extra headers hdr (may be nil) and
// decodes the response into out. A 304 Not Modified is not an error: out is
// left as it was.
func (c *Client) send(ctx context.Context, method, path string, hdr http.Header, in, out any) (*http.Response, error) {
	resp, err := c.open(ctx, method, path, hdr, in)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return resp, fmt.Errorf("reading response: %w", err)
	}
	if resp.StatusCode == http.StatusNotModified {
		return resp, nil
	}
	if resp.StatusCode >= 300 {
		return resp, responseError(resp.StatusCode, data)
	}
	switch out := out.(type) {
	case nil:
	case *[]byte:
		*out = data
	default:
		if err := json.Unmarshal(data, out); err != nil {
			return resp, fmt.Errorf("decoding response of %s %s: %w", method, path, err)
		}
	}
	return resp, nil
}

// open makes one request with the extra headers hdr (may be nil) and
// the JSON body in (nil: none), and returns the response unread.
func (c *Client) open(ctx context.Context, method, path string, hdr http.Header, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.project != "" {
		req.Header.Set(api.ProjectHeader, c.project)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	if c.identity != nil {
		tok, err := c.identity(ctx)
		if err != nil {
			return nil, &IdentityError{Err: err}
		}
		req.Header.Set(api.TokenHeader, tok)
	}
	return c.http.Do(req)
}

// responseError is the *Error of an error response of status with body
// data.
func responseError(status int, data []byte) error {
	var eb api.ErrorBody
	if json.Unmarshal(data, &eb) != nil || eb.Error.Code == "" {
		return &Error{Status: status, Code: api.Code(fmt.Sprintf("http_%d", status)), Message: strings.TrimSpace(string(data))}
	}
	return &Error{Status: status, Code: eb.Error.Code, Message: eb.Error.Message}
}

// Resolve resolves a request without creating anything.
func (c *Client) Resolve(ctx context.Context, r api.ResolveRequest) (api.Resolution, error) {
	var out api.Resolution
	return out, c.do(ctx, http.MethodPost, "/v1/resolve", r, &out)
}

// Create asks for a vTPM; it returns once the request is recorded, usually
// before the vTPM is active (see Wait).
func (c *Client) Create(ctx context.Context, r api.CreateVTPMRequest) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms", r, &out)
}

// Get reads a vTPM.
func (c *Client) Get(ctx context.Context, id string) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodGet, "/v1/vtpms/"+url.PathEscape(id), nil, &out)
}

// ListOptions filter and page List.
type ListOptions struct {
	Project, Host, Phase, After string
	Limit                       int
}

// List reads one page of vTPMs.
func (c *Client) List(ctx context.Context, o ListOptions) (api.VTPMList, error) {
	q := url.Values{}
	for k, v := range map[string]string{"project": o.Project, "host": o.Host, "phase": o.Phase, "after": o.After} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if o.Limit > 0 {
		q.Set("limit", fmt.Sprint(o.Limit))
	}
	var out api.VTPMList
	return out, c.do(ctx, http.MethodGet, "/v1/vtpms?"+q.Encode(), nil, &out)
}

// Delete asks for a vTPM's deletion.
func (c *Client) Delete(ctx context.Context, id string) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodDelete, "/v1/vtpms/"+url.PathEscape(id), nil, &out)
}

// Start asks for a stopped vTPM to run again.
func (c *Client) Start(ctx context.Context, id string) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/start", nil, &out)
}

// Stop asks for a vTPM to stop, keeping its state.
func (c *Client) Stop(ctx context.Context, id string) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/stop", nil, &out)
}

// Attach asks for a vTPM to be attached to a libvirt domain on its host.
func (c *Client) Attach(ctx context.Context, id, domain string) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/attach", api.AttachRequest{Domain: domain}, &out)
}

// Detach asks for a vTPM to be detached from its libvirt domain.
func (c *Client) Detach(ctx context.Context, id string) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/detach", nil, &out)
}

// Resize resizes instance id's vTPM to a new flavor and image on its host.
func (c *Client) Resize(ctx context.Context, id string, r api.ResizeRequest) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/resize", r, &out)
}

// ConfirmResize makes the vTPM's pending resize final.
func (c *Client) ConfirmResize(ctx context.Context, id string) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/resize/confirm", nil, &out)
}

// RevertResize undoes the vTPM's pending resize.
func (c *Client) RevertResize(ctx context.Context, id string) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/resize/revert", nil, &out)
}

// Adopt has vtpmd take over the vTPM Nova made for instance id (the
// operator's): it returns once the vTPM is recorded, with its EKs.
func (c *Client) Adopt(ctx context.Context, id string, r api.AdoptRequest) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/adopt", r, &out)
}

// Drift asks a host's agent what differs between its hypervisor and the
// records; repair deletes the orphans it finds.
func (c *Client) Drift(ctx context.Context, host string, repair bool) (api.Drift, error) {
	var out api.Drift
	if repair {
		return out, c.do(ctx, http.MethodPost, "/v1/hosts/"+url.PathEscape(host)+"/drift/repair", nil, &out)
	}
	return out, c.do(ctx, http.MethodGet, "/v1/hosts/"+url.PathEscape(host)+"/drift", nil, &out)
}

// Subject is what attests: an instance (its vTPM) or a host (its own TPM).
type Subject struct{ path string }

// Instance is the subject for an instance's vTPM.
func Instance(id string) Subject { return Subject{"/v1/vtpms/" + url.PathEscape(id) + "/attestation"} }

// Host is the subject for a host's own TPM.
func Host(name string) Subject { return Subject{"/v1/hosts/" + url.PathEscape(name) + "/attestation"} }

func (s Subject) op(op string) string {
	if op == "" {
		return s.path
	}
	return s.path + "/" + op
}

// Register submits an attestation key; the answer is the credential the
// TPM must activate.
func (c *Client) Register(ctx context.Context, s Subject, req api.RegisterRequest) (api.CredentialChallenge, error) {
	var out api.CredentialChallenge
	return out, c.do(ctx, http.MethodPost, s.op("register"), req, &out)
}

// Activate answers the registration's credential challenge; the answer
// carries the agent's bearer token (see WithAgentToken).
func (c *Client) Activate(ctx context.Context, s Subject, req api.ActivateRequest) (api.Activation, error) {
	var out api.Activation
	return out, c.do(ctx, http.MethodPost, s.op("activate"), req, &out)
}

// Nonce asks for the nonce the next quote must answer.
func (c *Client) Nonce(ctx context.Context, s Subject) (api.Nonce, error) {
	var out api.Nonce
	return out, c.do(ctx, http.MethodPost, s.op("nonce"), nil, &out)
}

// Evidence pushes a quote and gets the verdict.
func (c *Client) Evidence(ctx context.Context, s Subject, req api.EvidenceRequest) (api.Attestation, error) {
	var out api.Attestation
	return out, c.do(ctx, http.MethodPost, s.op("evidence"), req, &out)
}

// SetPolicy sets the measured-boot policy.
func (c *Client) SetPolicy(ctx context.Context, s Subject, req api.PolicyRequest) (api.Attestation, error) {
	var out api.Attestation
	return out, c.do(ctx, http.MethodPost, s.op("policy"), req, &out)
}

// RequestRefresh asks the subject's agent for fresh evidence now.
func (c *Client) RequestRefresh(ctx context.Context, s Subject) (api.Refresh, error) {
	var out api.Refresh
	return out, c.do(ctx, http.MethodPost, s.op("refresh"), nil, &out)
}

// AwaitRefresh is an agent's long poll: it returns as soon as fresh
// evidence is asked for (Requested, with the secrets revoked from the
// instance since), or after wait (capped at the server's 5m) without a
// request.
func (c *Client) AwaitRefresh(ctx context.Context, s Subject, wait time.Duration) (api.Refresh, error) {
	wait = min(wait, 5*time.Minute)
	var out api.Refresh
	err := c.do(ctx, http.MethodGet, s.op("refresh")+"?wait="+url.QueryEscape(wait.Round(time.Millisecond).String()), nil, &out)
	return out, err
}

// CreateBrokerSecret stores a secret the key broker releases to attested
// instances.
func (c *Client) CreateBrokerSecret(ctx context.Context, req api.CreateBrokerSecretRequest) (api.BrokerSecret, error) {
	var out api.BrokerSecret
	return out, c.do(ctx, http.MethodPost, "/v1/broker/secrets", req, &out)
}

// BrokerSecret reads a secret's record and its releases (never its
// payload).
func (c *Client) BrokerSecret(ctx context.Context, name string) (api.BrokerSecret, error) {
	var out api.BrokerSecret
	return out, c.do(ctx, http.MethodGet, "/v1/broker/secrets/"+url.PathEscape(name), nil, &out)
}

// BrokerSecrets lists the project's secrets.
func (c *Client) BrokerSecrets(ctx context.Context) (api.BrokerSecretList, error) {
	var out api.BrokerSecretList
	return out, c.do(ctx, http.MethodGet, "/v1/broker/secrets", nil, &out)
}

// DeleteBrokerSecret deletes a secret (its payload is shredded).
func (c *Client) DeleteBrokerSecret(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/broker/secrets/"+url.PathEscape(name), nil, nil)
}

// ReleaseSecret is a registered agent's request for a secret: the answer
// opens only in its instance's vTPM.
func (c *Client) ReleaseSecret(ctx context.Context, id, name string) (api.WrappedSecret, error) {
	var out api.WrappedSecret
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/secrets/"+url.PathEscape(name)+"/release", nil, &out)
}

// HyperVPlan is the PowerShell plan for a Hyper-V vTPM; vmName "" means
// the instance id.
func (c *Client) HyperVPlan(ctx context.Context, id, vmName string) (api.HyperVPlan, error) {
	var out api.HyperVPlan
	path := "/v1/vtpms/" + url.PathEscape(id) + "/hyperv/plan"
	if vmName != "" {
		path += "?vm_name=" + url.QueryEscape(vmName)
	}
	return out, c.do(ctx, http.MethodGet, path, nil, &out)
}

// CreateSecret stores key material; the answer never carries it.
func (c *Client) CreateSecret(ctx context.Context, req api.CreateSecretRequest) (api.Secret, error) {
	var out api.Secret
	return out, c.do(ctx, http.MethodPost, "/v1/secrets", req, &out)
}

// Secret reads a secret's metadata.
func (c *Client) Secret(ctx context.Context, id string) (api.Secret, error) {
	var out api.Secret
	return out, c.do(ctx, http.MethodGet, "/v1/secrets/"+url.PathEscape(id), nil, &out)
}

// HostCredential makes a host's key-manager credential (operator).
func (c *Client) HostCredential(ctx context.Context, host string) (api.HostCredential, error) {
	var out api.HostCredential
	return out, c.do(ctx, http.MethodPost, "/v1/hosts/"+url.PathEscape(host)+"/credentials", nil, &out)
}

// ForgetHost drops a host's attestation registration, so that a replaced
// TPM can register.
func (c *Client) ForgetHost(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, Host(name).op(""), nil, nil)
}

// History reads the attestation events, oldest first.
func (c *Client) History(ctx context.Context, s Subject) (api.EventList, error) {
	var out api.EventList
	return out, c.do(ctx, http.MethodGet, s.op("history"), nil, &out)
}

// CreatePolicy creates a named policy.
func (c *Client) CreatePolicy(ctx context.Context, req api.CreatePolicyRequest) (api.Policy, error) {
	var out api.Policy
	return out, c.do(ctx, http.MethodPost, "/v1/policies", req, &out)
}

// Policies lists the policies the caller sees.
func (c *Client) Policies(ctx context.Context) (api.PolicyList, error) {
	var out api.PolicyList
	return out, c.do(ctx, http.MethodGet, "/v1/policies", nil, &out)
}

// Policy reads a policy by name.
func (c *Client) Policy(ctx context.Context, name string) (api.Policy, error) {
	var out api.Policy
	return out, c.do(ctx, http.MethodGet, "/v1/policies/"+url.PathEscape(name), nil, &out)
}

// DeletePolicy deletes a policy by name.
func (c *Client) DeletePolicy(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/policies/"+url.PathEscape(name), nil, nil)
}

// Attestation reads the attestation status.
func (c *Client) Attestation(ctx context.Context, s Subject) (api.Attestation, error) {
	var out api.Attestation
	return out, c.do(ctx, http.MethodGet, s.op(""), nil, &out)
}

// Identity reads a vTPM's endorsement keys, certificates and CA chain.
func (c *Client) Identity(ctx context.Context, id string) (api.Identity, error) {
	var out api.Identity
	return out, c.do(ctx, http.MethodGet, "/v1/vtpms/"+url.PathEscape(id)+"/identity", nil, &out)
}

// Events reads a vTPM's audit log.
func (c *Client) Events(ctx context.Context, id string) (api.EventList, error) {
	var out api.EventList
	return out, c.do(ctx, http.MethodGet, "/v1/vtpms/"+url.PathEscape(id)+"/events", nil, &out)
}

// AllEvents reads the audit log of every vTPM the instance id has had,
// deleted ones included (the operator's).
func (c *Client) AllEvents(ctx context.Context, id string) (api.EventList, error) {
	var out api.EventList
	return out, c.do(ctx, http.MethodGet, "/v1/vtpms/"+url.PathEscape(id)+"/events?all=true", nil, &out)
}

// Hosts lists the hosts (the operator's).
func (c *Client) Hosts(ctx context.Context) (api.HostList, error) {
	var out api.HostList
	return out, c.do(ctx, http.MethodGet, "/v1/hosts", nil, &out)
}

// DrainHost stops new vTPMs being placed on a host (operator); its vTPMs
// stay.
func (c *Client) DrainHost(ctx context.Context, name string) (api.Host, error) {
	var out api.Host
	return out, c.do(ctx, http.MethodPost, "/v1/hosts/"+url.PathEscape(name)+"/drain", nil, &out)
}

// UndrainHost lets new vTPMs be placed on a drained host again (operator).
func (c *Client) UndrainHost(ctx context.Context, name string) (api.Host, error) {
	var out api.Host
	return out, c.do(ctx, http.MethodPost, "/v1/hosts/"+url.PathEscape(name)+"/undrain", nil, &out)
}

// GetHost reads one host (the operator's).
func (c *Client) GetHost(ctx context.Context, name string) (api.Host, error) {
	var out api.Host
	return out, c.do(ctx, http.MethodGet, "/v1/hosts/"+url.PathEscape(name), nil, &out)
}

// JoinToken makes a one-time join token for a host (operator), valid for
// ttl (0: the server's default).
func (c *Client) JoinToken(ctx context.Context, host string, ttl time.Duration) (api.JoinToken, error) {
	path := "/v1/hosts/" + url.PathEscape(host) + "/join-tokens"
	if ttl != 0 {
		path += "?ttl=" + url.QueryEscape(ttl.String())
	}
	var out api.JoinToken
	return out, c.do(ctx, http.MethodPost, path, nil, &out)
}

// ConsoleLink makes a sign-in link to the web console (operator): for
// the operator's view, or project's alone when project is set.
func (c *Client) ConsoleLink(ctx context.Context, project string) (api.ConsoleLink, error) {
	path := "/v1/console/links"
	if project != "" {
		path += "?project=" + url.QueryEscape(project)
	}
	var out api.ConsoleLink
	return out, c.do(ctx, http.MethodPost, path, nil, &out)
}

// EndConsoleSessions ends the web console's sessions and unused sign-in
// links (operator): every one, or with project that project's.
func (c *Client) EndConsoleSessions(ctx context.Context, project string) (api.ConsoleSessionsEnded, error) {
	path := "/v1/console/sessions"
	if project != "" {
		path += "?project=" + url.QueryEscape(project)
	}
	var out api.ConsoleSessionsEnded
	return out, c.do(ctx, http.MethodDelete, path, nil, &out)
}

// RevokeHost revokes every certificate of a host and its unused join
// tokens (operator).
func (c *Client) RevokeHost(ctx context.Context, host string) (api.HostRevocation, error) {
	var out api.HostRevocation
	return out, c.do(ctx, http.MethodPost, "/v1/hosts/"+url.PathEscape(host)+"/revoke", nil, &out)
}

// Enroll exchanges a join token and a certificate request for the host's
// client certificate (a host's agent, before it has one).
func (c *Client) Enroll(ctx context.Context, req api.EnrollRequest) (api.Enrollment, error) {
	var out api.Enrollment
	return out, c.do(ctx, http.MethodPost, "/v1/agent/enroll", req, &out)
}

// Heartbeat tells the server that the host's agent is alive; the client
// must present the host's certificate (WithTLS).
func (c *Client) Heartbeat(ctx context.Context, req api.HeartbeatRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/agent/heartbeat", req, nil)
}

// CA returns the deployment CA chain (PEM).
func (c *Client) CA(ctx context.Context) ([]byte, error) {
	var out []byte
	return out, c.do(ctx, http.MethodGet, "/v1/ca", nil, &out)
}

// VerdictToken is an instance's attestation verdict signed by the verifier.
func (c *Client) VerdictToken(ctx context.Context, id string) (string, error) {
	var out api.VerdictToken
	return out.Token, c.do(ctx, http.MethodGet, Instance(id).op("token"), nil, &out)
}

// VerdictKeys is the verifier's public keys (JWKS) that verdict tokens
// verify against.
func (c *Client) VerdictKeys(ctx context.Context) ([]byte, error) {
	var out []byte
	return out, c.do(ctx, http.MethodGet, "/.well-known/vtpmd/jwks.json", nil, &out)
}

// CreateBackup has the vTPM of instance id backed up now.
func (c *Client) CreateBackup(ctx context.Context, id string) (api.Backup, error) {
	var out api.Backup
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/backups", nil, &out)
}

// Backups lists the backups of the vTPM of instance id, newest first.
func (c *Client) Backups(ctx context.Context, id string) (api.BackupList, error) {
	var out api.BackupList
	return out, c.do(ctx, http.MethodGet, "/v1/vtpms/"+url.PathEscape(id)+"/backups", nil, &out)
}

// RestoreBackup replaces the state of the (stopped) vTPM of instance id
// with a backup.
func (c *Client) RestoreBackup(ctx context.Context, id string, r api.RestoreRequest) (api.Backup, error) {
	var out api.Backup
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/backups/restore", r, &out)
}

// Migrate moves the vTPM of instance id, cold, to another host (the
// operator's): r.Host, or the one placement chooses. It returns once the
// move is done; the same call again continues one that was cut short.
func (c *Client) Migrate(ctx context.Context, id string, r api.MigrateRequest) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/migrate", r, &out)
}

// LiveMigrate moves the vTPM of instance id with its running guest to
// another host (the operator's): r.Host, or the one placement chooses. It
// returns once the guest runs there and the old host is cleaned.
func (c *Client) LiveMigrate(ctx context.Context, id string, r api.LiveMigrateRequest) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/live-migrate", r, &out)
}

// Shelve puts the (stopped) vTPM of instance id on the shelf: its state
// kept by the server, removed from its host.
func (c *Client) Shelve(ctx context.Context, id string) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/shelve", nil, &out)
}

// Unshelve places the shelved vTPM of instance id on host ("": the
// placement rules choose) and imports its state there.
func (c *Client) Unshelve(ctx context.Context, id, host string) (api.VTPM, error) {
	var out api.VTPM
	return out, c.do(ctx, http.MethodPost, "/v1/vtpms/"+url.PathEscape(id)+"/unshelve", api.UnshelveRequest{Host: host}, &out)
}

// Evacuate moves the vTPMs of host, which is gone, to other hosts
// (operator). The server streams its progress: progress, if not nil, is
// called with each line before the last (the count, then each vTPM's
// outcome). An evacuation cut short once it began is an *Error too.
func (c *Client) Evacuate(ctx context.Context, host string, r api.EvacuateRequest, progress func(api.EvacuationProgress)) (api.Evacuation, error) {
	return c.evacuation(ctx, "/v1/hosts/"+url.PathEscape(host)+"/evacuate", r, progress)
}

// EvacuateLive drains host and moves its vTPMs, with their state, to
// other hosts: those wanted running by live migration, the others cold
// (operator). Its progress is streamed as for Evacuate.
func (c *Client) EvacuateLive(ctx context.Context, host string, r api.EvacuateLiveRequest, progress func(api.EvacuationProgress)) (api.Evacuation, error) {
	return c.evacuation(ctx, "/v1/hosts/"+url.PathEscape(host)+"/evacuate-live", r, progress)
}

// evacuation asks for the evacuation at path, with body in, and reads its
// streamed progress, as Evacuate says.
func (c *Client) evacuation(ctx context.Context, path string, in any, progress func(api.EvacuationProgress)) (api.Evacuation, error) {
	resp, err := c.open(ctx, http.MethodPost, path, http.Header{"Accept": {"application/x-ndjson"}}, in)
	if err != nil {
		return api.Evacuation{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return api.Evacuation{}, responseError(resp.StatusCode, data)
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var p api.EvacuationProgress
		if err := dec.Decode(&p); err != nil {
			return api.Evacuation{}, fmt.Errorf("reading the evacuation's progress: %w", err)
		}
		switch {
		case p.Error != nil:
			return api.Evacuation{}, &Error{Status: p.Status, Code: p.Error.Code, Message: p.Error.Message}
		case p.Result != nil:
			return *p.Result, nil
		case progress != nil:
			progress(p)
		}
	}
}
