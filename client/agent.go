package client

import (
	"context"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/vtpmd/vtpmd/api"
)

// The agent protocol: a host's agent calls these with the host
// certificate it got at enrolment (WithTLS); the host is the one the
// certificate names.

// RegisterHost records what the host's backend offers.
func (c *Client) RegisterHost(ctx context.Context, h api.AgentHost) error {
	return c.do(ctx, http.MethodPut, "/v1/agent/host", h, nil)
}

// WatchVTPMs returns what changed among the host's vTPMs after revision
// since (0: everything), waiting up to wait for a change.
func (c *Client) WatchVTPMs(ctx context.Context, since int64, wait time.Duration) (api.AgentChanges, error) {
	var out api.AgentChanges
	q := url.Values{"since": {strconv.FormatInt(since, 10)}, "wait": {wait.String()}}
	return out, c.do(ctx, http.MethodGet, "/v1/agent/vtpms?"+q.Encode(), nil, &out)
}

// AgentVTPM reads one of the host's vTPMs.
func (c *Client) AgentVTPM(ctx context.Context, id string) (api.AgentVTPM, error) {
	var out api.AgentVTPM
	return out, c.do(ctx, http.MethodGet, agentVTPMPath(id, ""), nil, &out)
}

// ReportVTPM records the agent's observed state of a vTPM.
func (c *Client) ReportVTPM(ctx context.Context, id string, r api.AgentReport) (api.AgentWritten, error) {
	var out api.AgentWritten
	return out, c.do(ctx, http.MethodPut, agentVTPMPath(id, ""), r, &out)
}

// VTPMDeleted says the vTPM's state is gone: its record goes.
func (c *Client) VTPMDeleted(ctx context.Context, id string, d api.AgentDeletion) error {
	return c.do(ctx, http.MethodPost, agentVTPMPath(id, "/deleted"), d, nil)
}

// VTPMSecret reads the secret that keys the state of the vTPM of
// incarnation.
func (c *Client) VTPMSecret(ctx context.Context, id, incarnation string) (api.AgentSecret, error) {
	var out api.AgentSecret
	return out, c.do(ctx, http.MethodGet, agentVTPMPath(id, "/secret")+"?incarnation="+url.QueryEscape(incarnation), nil, &out)
}

// RekeyVTPM gives a vTPM not yet manufactured a new secret.
func (c *Client) RekeyVTPM(ctx context.Context, id string, r api.AgentRekey) (api.AgentWritten, error) {
	var out api.AgentWritten
	return out, c.do(ctx, http.MethodPost, agentVTPMPath(id, "/rekey"), r, &out)
}

// ResizedVTPM says the agent finished a confirmed or reverted resize's
// step: the resize ends.
func (c *Client) ResizedVTPM(ctx context.Context, id string, r api.AgentResized) (api.AgentWritten, error) {
	var out api.AgentWritten
	return out, c.do(ctx, http.MethodPost, agentVTPMPath(id, "/resized"), r, &out)
}

func agentVTPMPath(id, op string) string { return "/v1/agent/vtpms/" + url.PathEscape(id) + op }

// CertifyEK has the deployment CA certify the EK of a vTPM the host is
// manufacturing.
func (c *Client) CertifyEK(ctx context.Context, req api.EKCertificateRequest) ([]byte, error) {
	var out api.IssuedEKCertificate
	return out.Certificate, c.do(ctx, http.MethodPost, "/v1/agent/ek-certificates", req, &out)
}

// AdoptionSecret reads, for the host's answer to adoption request id, the
// secret secretID that keys the state of the vTPM it is to take over.
func (c *Client) AdoptionSecret(ctx context.Context, id, secretID string) (api.AgentSecret, error) {
	var out api.AgentSecret
	return out, c.do(ctx, http.MethodGet, "/v1/agent/adoptions/"+url.PathEscape(id)+"/secret?secret_ref="+url.QueryEscape(secretID), nil, &out)
}

// AnswerAdoption answers adoption request id.
func (c *Client) AnswerAdoption(ctx context.Context, id string, a api.AgentAdoption) error {
	return c.do(ctx, http.MethodPut, "/v1/agent/adoptions/"+url.PathEscape(id), a, nil)
}

// ReportDrift answers the operator's drift request.
func (c *Client) ReportDrift(ctx context.Context, r api.AgentDriftReport) error {
	return c.do(ctx, http.MethodPut, "/v1/agent/drift", r, nil)
}

// Renew exchanges a certificate request for the host's next client
// certificate; the client must present the current one.
func (c *Client) Renew(ctx context.Context, req api.RenewRequest) (api.Enrollment, error) {
	var out api.Enrollment
	return out, c.do(ctx, http.MethodPost, "/v1/agent/renew", req, &out)
}

// TransferInput reads what the host needs to answer transfer request id:
// the vTPM's secret and, for an import, the bundle.
func (c *Client) TransferInput(ctx context.Context, id string) (api.AgentTransferInput, error) {
	var out api.AgentTransferInput
	return out, c.do(ctx, http.MethodGet, "/v1/agent/transfers/"+url.PathEscape(id), nil, &out)
}

// TakeTransfer says the agent's run (api.AgentHost.Run) carries out
// transfer request id apart from its watch, which carries it no more for
// that run; 404 if the host has no such request waiting.
func (c *Client) TakeTransfer(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/v1/agent/transfers/"+url.PathEscape(id)+"/take", nil, nil)
}

// AnswerTransfer answers transfer request id.
func (c *Client) AnswerTransfer(ctx context.Context, id string, a api.AgentTransfer) error {
	return c.do(ctx, http.MethodPut, "/v1/agent/transfers/"+url.PathEscape(id), a, nil)
}
