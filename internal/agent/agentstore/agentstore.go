// Package agentstore gives an agent the control plane's records
// (agent.Records) straight from the store, for an agent that runs in the
// store's process (vtpmd all-in-one).
package agentstore

import (
	"context"
	"errors"
	"fmt"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/store"
)

// Records reads and writes vTPM and host records in a store.
type Records struct{ st *store.Store }

var _ agent.Records = (*Records)(nil)

// New gives agents st's records.
func New(st *store.Store) *Records { return &Records{st: st} }

// RegisterHost implements agent.Records.
func (r *Records) RegisterHost(ctx context.Context, h agent.Host) error {
	return r.st.Update(ctx, func(tx *store.Tx) error {
		return tx.PutHost(&store.Host{Name: h.Name, Traits: h.Traits, Capacity: h.Capacity, Backend: h.Backend, Version: h.Version})
	})
}

// Heartbeat implements agent.Records.
func (r *Records) Heartbeat(ctx context.Context, hb agent.Heartbeat) error {
	return agentError(r.st.Update(ctx, func(tx *store.Tx) error { return tx.Heartbeat(hb.Host, hb.Version) }))
}

// List implements agent.Records.
func (r *Records) List(ctx context.Context, host string) ([]*agent.Record, error) {
	var vs []*store.VTPM
	err := r.st.View(ctx, func(tx *store.Tx) (err error) {
		vs, err = tx.ListVTPMs(store.Filter{Host: host})
		return err
	})
	if err != nil {
		return nil, err
	}
	out := make([]*agent.Record, len(vs))
	for i, v := range vs {
		out[i] = record(v)
	}
	return out, nil
}

// Get implements agent.Records.
func (r *Records) Get(ctx context.Context, instanceID string) (*agent.Record, error) {
	var v *store.VTPM
	err := r.st.View(ctx, func(tx *store.Tx) (err error) {
		v, err = tx.GetVTPM(instanceID)
		return err
	})
	if err != nil {
		return nil, agentError(err)
	}
	return record(v), nil
}

// Update implements agent.Records. It writes the whole row back, which
// changes only what the agent changed: the generation check refuses a row
// anyone else changed since it was read.
func (r *Records) Update(ctx context.Context, rec *agent.Record, ev agent.Event) error {
	var generation int64
	err := r.st.Update(ctx, func(tx *store.Tx) error {
		v := row(rec) // afresh on each attempt: one rolled back may have bumped its generation
		if err := tx.UpdateVTPM(v); err != nil {
			return err
		}
		generation = v.Generation
		return tx.AppendEvent(store.Event{Actor: ev.Actor, InstanceID: rec.InstanceID, Action: ev.Action, Detail: ev.Detail})
	})
	if err != nil {
		return agentError(err)
	}
	rec.Generation = generation
	return nil
}

// Delete implements agent.Records.
func (r *Records) Delete(ctx context.Context, instanceID string, ev agent.Event) error {
	err := r.st.Update(ctx, func(tx *store.Tx) error {
		if err := tx.DeleteVTPM(instanceID); err != nil {
			return err
		}
		if err := tx.DeleteAttestation(instanceID); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: ev.Actor, InstanceID: instanceID, Action: ev.Action, Detail: ev.Detail})
	})
	return agentError(err)
}

// agentError says the store's not-found and conflict in the agent's words,
// keeping the store's error in the chain.
func agentError(err error) error {
	switch {
	case errors.Is(err, store.ErrNotFound):
		return fmt.Errorf("%w: %w", agent.ErrNotFound, err)
	case errors.Is(err, store.ErrConflict):
		return fmt.Errorf("%w: %w", agent.ErrConflict, err)
	}
	return err
}

func record(v *store.VTPM) *agent.Record {
	r := &agent.Record{InstanceID: v.InstanceID, Incarnation: v.Incarnation, Project: v.Project, Spec: v.Spec, Host: v.Host,
		Domain: v.Domain, Desired: agent.Desired(v.Desired), Phase: agent.Phase(v.Phase), Reason: v.Reason, SecretID: v.SecretID,
		Sockets: api.Sockets{Data: v.Sockets.Data, Ctrl: v.Sockets.Ctrl}, Generation: v.Generation}
	for _, ek := range v.EKs {
		r.EKs = append(r.EKs, agent.EK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: ek.PublicDER, CertDER: ek.CertDER})
	}
	return r
}

func row(r *agent.Record) *store.VTPM {
	v := &store.VTPM{InstanceID: r.InstanceID, Incarnation: r.Incarnation, Project: r.Project, Spec: r.Spec, Host: r.Host,
		Domain: r.Domain, Desired: store.Desired(r.Desired), Phase: store.Phase(r.Phase), Reason: r.Reason, SecretID: r.SecretID,
		Sockets: store.Sockets{Data: r.Sockets.Data, Ctrl: r.Sockets.Ctrl}, Generation: r.Generation}
	for _, ek := range r.EKs {
		v.EKs = append(v.EKs, store.EK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: ek.PublicDER, CertDER: ek.CertDER})
	}
	return v
}
