// Package agentclient gives an agent the control plane's records
// (agent.Records) over the agent protocol, as vtpmd agent on a hypervisor
// host reaches its server: every call is one HTTPS request with the host's
// certificate, so the host is the one it names.
package agentclient

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// Records calls the server for the agent.
type Records struct{ c *client.Client }

var _ agent.Records = (*Records)(nil)

// New gives an agent the records of the server c calls, with the host's
// certificate.
func New(c *client.Client) *Records { return &Records{c: c} }

// RegisterHost implements agent.Records.
func (r *Records) RegisterHost(ctx context.Context, h agent.Host) error {
	return agentError(r.c.RegisterHost(ctx, api.AgentHost{Traits: h.Traits, Capacity: h.Capacity, Backend: h.Backend, Version: h.Version, Run: h.Run}))
}

// Heartbeat implements agent.Records.
func (r *Records) Heartbeat(ctx context.Context, hb agent.Heartbeat) error {
	return agentError(r.c.Heartbeat(ctx, api.HeartbeatRequest{Version: hb.Version}))
}

// Watch implements agent.Records; host is the certificate's.
func (r *Records) Watch(ctx context.Context, host string, since int64, wait time.Duration) (*agent.Changes, error) {
	ch, err := r.c.WatchVTPMs(ctx, since, wait)
	if err != nil {
		return nil, agentError(err)
	}
	out := &agent.Changes{Revision: ch.Revision, Reset: ch.Reset, Records: make([]*agent.Record, len(ch.VTPMs))}
	for i, v := range ch.VTPMs {
		out.Records[i] = record(v)
	}
	for _, g := range ch.Gone {
		out.Gone = append(out.Gone, agent.Gone{InstanceID: g.InstanceID, Incarnation: g.Incarnation})
	}
	if ch.Drift != nil {
		out.Drift = agent.DriftAsk{ID: ch.Drift.ID, Repair: ch.Drift.Repair}
	}
	for _, a := range ch.Adoptions {
		out.Adoptions = append(out.Adoptions, agent.AdoptionAsk{ID: a.ID, InstanceID: a.InstanceID, Domain: a.Domain, SecretID: a.SecretRef})
	}
	for _, x := range ch.Transfers {
		out.Transfers = append(out.Transfers, agent.TransferAsk{ID: x.ID, InstanceID: x.InstanceID, Incarnation: x.Incarnation,
			Kind: agent.TransferKind(x.Kind), Generation: x.Generation})
	}
	return out, nil
}

// ReportDrift implements agent.Records; host is the certificate's.
func (r *Records) ReportDrift(ctx context.Context, host string, asked int64, findings []api.Finding) error {
	return agentError(r.c.ReportDrift(ctx, api.AgentDriftReport{Asked: asked, Findings: findings}))
}

// Get implements agent.Records.
func (r *Records) Get(ctx context.Context, instanceID string) (*agent.Record, error) {
	v, err := r.c.AgentVTPM(ctx, instanceID)
	if err != nil {
		return nil, agentError(err)
	}
	return record(v), nil
}

// Update implements agent.Records.
func (r *Records) Update(ctx context.Context, rec *agent.Record, ev agent.Event) error {
	rep := api.AgentReport{Incarnation: rec.Incarnation, Generation: rec.Generation, Phase: string(rec.Phase), Reason: rec.Reason,
		EKs: apiEKs(rec.EKs), SwtpmPID: rec.PID, GuestConnected: rec.Connected, Event: api.AgentEvent{Action: ev.Action, Detail: ev.Detail}}
	if rec.Sockets != (api.Sockets{}) {
		rep.Sockets = &rec.Sockets
	}
	w, err := r.c.ReportVTPM(ctx, rec.InstanceID, rep)
	if err != nil {
		return agentError(err)
	}
	rec.Generation = w.Generation
	return nil
}

// Delete implements agent.Records.
func (r *Records) Delete(ctx context.Context, rec *agent.Record, ev agent.Event) error {
	return agentError(r.c.VTPMDeleted(ctx, rec.InstanceID, api.AgentDeletion{Incarnation: rec.Incarnation, Generation: rec.Generation,
		Event: api.AgentEvent{Action: ev.Action, Detail: ev.Detail}}))
}

// Secret implements agent.Records.
func (r *Records) Secret(ctx context.Context, rec *agent.Record) ([]byte, error) {
	s, err := r.c.VTPMSecret(ctx, rec.InstanceID, rec.Incarnation)
	if err != nil {
		return nil, agentError(err)
	}
	return s.Payload, nil
}

// Rekey implements agent.Records.
func (r *Records) Rekey(ctx context.Context, rec *agent.Record, secret []byte, ev agent.Event) error {
	w, err := r.c.RekeyVTPM(ctx, rec.InstanceID, api.AgentRekey{Incarnation: rec.Incarnation, Generation: rec.Generation, Payload: secret,
		Event: api.AgentEvent{Action: ev.Action, Detail: ev.Detail}})
	if err != nil {
		return agentError(err)
	}
	rec.SecretID, rec.Generation = w.SecretRef, w.Generation
	return nil
}

// Resized implements agent.Records.
func (r *Records) Resized(ctx context.Context, rec *agent.Record, ev agent.Event) error {
	w, err := r.c.ResizedVTPM(ctx, rec.InstanceID, api.AgentResized{Incarnation: rec.Incarnation, Generation: rec.Generation,
		Event: api.AgentEvent{Action: ev.Action, Detail: ev.Detail}})
	if err != nil {
		return agentError(err)
	}
	rec.Generation, rec.Resize = w.Generation, ""
	return nil
}

// AdoptionSecret implements agent.Records; host is the certificate's. The
// server's refusals (secret_not_found, already_managed,
// secret_needs_owner) come back as refusals, for the agent's answer.
func (r *Records) AdoptionSecret(ctx context.Context, host string, ask agent.AdoptionAsk, secretID string) ([]byte, error) {
	s, err := r.c.AdoptionSecret(ctx, ask.ID, secretID)
	var e *client.Error
	if errors.As(err, &e) {
		switch e.Code {
		case api.CodeSecretNotFound:
			return nil, refusal.NotFound(e.Code, e.Message)
		case api.CodeAlreadyManaged:
			return nil, refusal.Conflict(e.Code, e.Message)
		case api.CodeSecretNeedsOwner:
			return nil, refusal.Forbidden(e.Code, e.Message)
		}
	}
	if err != nil {
		return nil, agentError(err)
	}
	return s.Payload, nil
}

// AnswerAdoption implements agent.Records; host is the certificate's.
func (r *Records) AnswerAdoption(ctx context.Context, host string, ask agent.AdoptionAsk, answer agent.Adoption) error {
	return agentError(r.c.AnswerAdoption(ctx, ask.ID, answer.API()))
}

// TransferInput implements agent.Records; host is the certificate's.
func (r *Records) TransferInput(ctx context.Context, host string, ask agent.TransferAsk) (*agent.TransferInput, error) {
	in, err := r.c.TransferInput(ctx, ask.ID)
	if err != nil {
		return nil, agentError(err)
	}
	out := &agent.TransferInput{Secret: in.Payload, Bundle: in.Bundle, Cancel: in.Cancel}
	if in.VTPM != nil {
		out.Record = record(*in.VTPM)
	}
	return out, nil
}

// TakeTransfer implements agent.Records; host is the certificate's.
func (r *Records) TakeTransfer(ctx context.Context, host string, ask agent.TransferAsk) error {
	return agentError(r.c.TakeTransfer(ctx, ask.ID))
}

// AnswerTransfer implements agent.Records; host is the certificate's.
func (r *Records) AnswerTransfer(ctx context.Context, host string, ask agent.TransferAsk, answer agent.Transfer) error {
	return agentError(r.c.AnswerTransfer(ctx, ask.ID, answer.API()))
}

// agentError says the API's 404 and 409 in the agent's words.
func agentError(err error) error {
	var e *client.Error
	switch {
	case err == nil:
		return nil
	case client.IsNotFound(err):
		return fmt.Errorf("%w: %w", agent.ErrNotFound, err)
	case client.ErrorCode(err) == api.CodeSecretNeedsOwner:
		return fmt.Errorf("%w: %w", agent.ErrNeedsOwner, err)
	case client.IsConflict(err) && client.ErrorCode(err) == api.CodeConflict:
		return fmt.Errorf("%w: %w", agent.ErrConflict, err)
	case errors.As(err, &e) && e.Status == http.StatusUnauthorized:
		return fmt.Errorf("the server refused this host's certificate (revoked, or not enrolled): %w", err)
	}
	return err
}

func record(v api.AgentVTPM) *agent.Record {
	r := &agent.Record{InstanceID: v.InstanceID, Incarnation: v.Incarnation, Project: v.Project, Spec: spec.FromAPI(v.Spec), Host: v.Host,
		Domain: v.Domain, Desired: agent.Desired(v.Desired), Phase: agent.Phase(v.Phase), Reason: v.Reason, SecretID: v.SecretRef,
		PID: v.SwtpmPID, Connected: v.GuestConnected, Resize: agent.ResizeStep(v.Resize), Generation: v.Generation}
	if v.Sockets != nil {
		r.Sockets = *v.Sockets
	}
	for _, ek := range v.EKs {
		r.EKs = append(r.EKs, agent.EK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: ek.Public, CertDER: ek.Certificate})
	}
	return r
}

func apiEKs(eks []agent.EK) []api.AgentEK {
	out := []api.AgentEK{}
	for _, ek := range eks {
		out = append(out, api.AgentEK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, Public: ek.PublicDER, Certificate: ek.CertDER})
	}
	return out
}
