// Package agentstore gives agents the control plane's records
// (agent.Records) straight from the store and the key manager: the agent of
// vtpmd all-in-one uses it in-process, and the server answers the agent
// protocol with it, for the host a client certificate names.
package agentstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/vtpms"
)

// Records reads and writes vTPM and host records in a store, and the
// secrets that key the vTPMs' state in a key manager.
type Records struct {
	st     *store.Store
	kr     keyring.Keyring
	staged Unstager
	log    *slog.Logger
}

// Unstager gives out, once, a vTPM secret its owner's request staged for
// the host's agent (vtpms.OwnerHeld): the embedded keyring.
type Unstager interface {
	TakeStaged(tx *store.Tx, id string, now time.Time) (keyring.Secret, error)
}

var _ agent.Records = (*Records)(nil)

// New gives agents st's records and kr's secrets; the secrets of vTPMs
// whose owners hold them come from staged, once each.
func New(st *store.Store, kr keyring.Keyring, staged Unstager, log *slog.Logger) *Records {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Records{st: st, kr: kr, staged: staged, log: log}
}

// errNeedsOwner refuses a host the secret of a vTPM whose owner holds it,
// when none is staged.
func errNeedsOwner(v *store.VTPM) error {
	return refusal.Forbidden(api.CodeSecretNeedsOwner, fmt.Sprintf(
		"The vTPM's secret security is %s and its secret is kept in project %s's key manager: the host can start the vTPM only after a request of that project (create, start) with its token.",
		v.Spec.SecretSecurity, v.Project))
}

// RegisterHost implements agent.Records.
func (r *Records) RegisterHost(ctx context.Context, h agent.Host) error {
	return r.st.Update(ctx, func(tx *store.Tx) error {
		return tx.PutHost(&store.Host{Name: h.Name, Traits: h.Traits, Capacity: h.Capacity, Backend: h.Backend, Version: h.Version, AgentRun: h.Run})
	})
}

// Heartbeat implements agent.Records.
func (r *Records) Heartbeat(ctx context.Context, hb agent.Heartbeat) error {
	return agentError(r.st.Update(ctx, func(tx *store.Tx) error { return tx.Heartbeat(hb.Host, hb.Version) }))
}

// rereadEvery is how often a waiting watch reads again though nothing woke
// it: commits of other processes sharing a PostgreSQL database wake it
// through the store's notifications, so this is only the net for one
// lost while the store's listener reconnected. Every connected agent's
// watch rereads this often (two or three statements): with hundreds of
// hosts it would otherwise be most of an idle server's load.
const rereadEvery = 30 * time.Second

// Watch implements agent.Records.
func (r *Records) Watch(ctx context.Context, host string, since int64, wait time.Duration) (*agent.Changes, error) {
	waiting, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	return r.WatchUntil(ctx, host, since, waiting.Done())
}

// WatchUntil reads the changes on host after since and, while there are
// none, waits for this process's next commit on host (rereading every
// second, for other processes' commits) until over. A host that never had
// a vTPM is at revision 0, so its watcher asks from 0 again and again: the
// empty start-over it would be told is no news to one that saw nothing,
// and it waits too.
func (r *Records) WatchUntil(ctx context.Context, host string, since int64, over <-chan struct{}) (*agent.Changes, error) {
	reread := time.NewTicker(rereadEvery)
	defer reread.Stop()
	for {
		changed := r.st.HostChanged(host)
		var ch *store.Changes
		err := r.st.View(ctx, func(tx *store.Tx) (err error) {
			ch, err = tx.WatchVTPMs(host, since)
			return err
		})
		if err != nil {
			return nil, err
		}
		if ch.Reset && (since != 0 || ch.Token != 0) || len(ch.VTPMs) > 0 || len(ch.Gone) > 0 || ch.DriftAsked != 0 || len(ch.Adoptions) > 0 || len(ch.Transfers) > 0 {
			return changes(ch), nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-over:
			return changes(ch), nil
		case <-changed:
		case <-reread.C:
		}
	}
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

// Placed reads instanceID's record for host's agent: refused (and the
// attempt logged as the vTPM's event) if the vTPM is placed on another
// host, so that no host reads another's desired state or secrets.
func (r *Records) Placed(ctx context.Context, host, instanceID string) (*agent.Record, error) {
	rec, err := r.Get(ctx, instanceID)
	if err != nil || rec.Host == host {
		return rec, err
	}
	return nil, r.refuse(ctx, host, instanceID, rec.Host)
}

// refuse logs, and records as the vTPM's event, that host asked for a
// vTPM placed on another, and returns the refusal.
func (r *Records) refuse(ctx context.Context, host, instanceID, placedOn string) error {
	r.log.Warn("a host asked for a vTPM placed on another host", "host", host, "instance", instanceID, "placed_on", placedOn)
	err := r.st.Update(ctx, func(tx *store.Tx) error {
		return tx.AppendEvent(store.Event{Actor: "host:" + host, InstanceID: instanceID, Action: "refused",
			Detail: fmt.Sprintf("host %s asked for this vTPM, which is placed on %s", host, placedOn)})
	})
	return errors.Join(errOtherHost, err)
}

var errOtherHost = refusal.Forbidden(api.CodeForbidden, "The vTPM is placed on another host.")

// placedElsewhere is a refusal found inside a transaction, to be recorded
// (refuse) after it rolled back.
type placedElsewhere struct{ host string }

func (e *placedElsewhere) Error() string { return "the vTPM is placed on host " + e.host }

// Update implements agent.Records: rec.Host is the host reporting, which
// must be the vTPM's. Only what an agent observes is taken from rec;
// endorsement keys, once recorded, never change. The write checks all
// that itself (store.Tx.ObserveVTPM); only when it writes nothing is the
// record read, to tell why.
func (r *Records) Update(ctx context.Context, rec *agent.Record, ev agent.Event) error {
	if err := validObserved(rec); err != nil {
		return err
	}
	o := store.Observation{InstanceID: rec.InstanceID, Incarnation: rec.Incarnation, Generation: rec.Generation, Host: rec.Host,
		Phase: store.Phase(rec.Phase), Reason: rec.Reason, EKs: eksRow(rec.EKs),
		Sockets: store.Sockets{Data: rec.Sockets.Data, Ctrl: rec.Sockets.Ctrl}, PID: rec.PID, Connected: rec.Connected}
	var generation int64
	var secretID string
	err := r.st.Update(ctx, func(tx *store.Tx) error {
		var ok bool
		var err error
		generation, secretID, ok, err = tx.ObserveVTPM(o)
		if err == nil && !ok {
			generation, secretID, err = observeRead(tx, rec, o)
		}
		if err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: ev.Actor, InstanceID: rec.InstanceID, Action: ev.Action, Detail: ev.Detail})
	})
	var elsewhere *placedElsewhere
	if errors.As(err, &elsewhere) {
		return r.refuse(ctx, rec.Host, rec.InstanceID, elsewhere.host)
	}
	if err != nil {
		return agentError(err)
	}
	rec.Generation, rec.SecretID = generation, secretID
	return nil
}

// observeRead reads the vTPM o was not written to, to tell why: not found,
// placed on another host, another incarnation or changed since, or
// endorsement keys other than those recorded. If none of those holds
// (keys recorded in an older encoding, equal but not the same text), it
// writes o over the record read.
func observeRead(tx *store.Tx, rec *agent.Record, o store.Observation) (generation int64, secretID string, err error) {
	v, err := tx.GetVTPM(o.InstanceID)
	if err != nil {
		return 0, "", err
	}
	if v.Host != o.Host {
		return 0, "", &placedElsewhere{host: v.Host}
	}
	if err := unchanged(v, rec); err != nil {
		return 0, "", err
	}
	if len(v.EKs) > 0 && !slices.EqualFunc(v.EKs, o.EKs, sameEK) {
		return 0, "", refusal.Invalid(api.CodeInvalidParameter, "A vTPM's endorsement keys never change once recorded.")
	}
	v.Phase, v.Reason, v.EKs, v.Sockets, v.PID, v.Connected = o.Phase, o.Reason, o.EKs, o.Sockets, o.PID, o.Connected
	if err := tx.UpdateVTPM(v); err != nil {
		return 0, "", err
	}
	return v.Generation, v.SecretID, nil
}

// Delete implements agent.Records: the record goes, then its secret (the
// API shredded it when the delete was asked for; this is in case). A
// secret the vTPM's owner holds is shredded with the owner's token by the
// API alone: vtpmd cannot.
func (r *Records) Delete(ctx context.Context, rec *agent.Record, ev agent.Event) error {
	err := keyring.ShredRecorded(ctx, r.kr, func() ([]string, error) {
		var secret string
		err := r.st.Update(ctx, func(tx *store.Tx) error {
			v, err := current(tx, rec)
			if err != nil {
				return err
			}
			if v.Desired != store.DesiredDeleted {
				return refusal.Conflict(api.CodeConflict, "Only a vTPM asked to be deleted can be.")
			}
			if !vtpms.OwnerHeld(r.kr, v.Spec) {
				secret = v.SecretID
			}
			if err := tx.DropStaged(v.SecretID); err != nil {
				return err
			}
			if err := tx.DeleteVTPM(v.InstanceID); err != nil {
				return err
			}
			return tx.AppendEvent(store.Event{Actor: ev.Actor, InstanceID: v.InstanceID, Action: ev.Action, Detail: ev.Detail})
		})
		return []string{secret}, err
	})
	return agentError(err)
}

// Secret implements agent.Records: the secret of a vTPM that is to run
// (or, with secret security host, whose resize is being reverted: the
// host's hypervisor held the old TPM's secret before the resize, and gets
// it back with the old TPM, agent.Resizer), for the host rec names, which must be the vTPM's (refused otherwise, as
// Placed refuses); rec.SecretID is set to the secret's id. An empty
// rec.Incarnation asks for the vTPM's current one. The secret of a vTPM
// whose owner holds it (vtpms.OwnerHeld) is the one its owner's request
// staged, given out once; without it, agent.ErrNeedsOwner.
func (r *Records) Secret(ctx context.Context, rec *agent.Record) ([]byte, error) {
	var v *store.VTPM
	err := r.st.View(ctx, func(tx *store.Tx) (err error) {
		v, err = tx.GetVTPM(rec.InstanceID)
		return err
	})
	switch {
	case err != nil:
		return nil, agentError(err)
	case v.Host != rec.Host:
		return nil, r.refuse(ctx, rec.Host, rec.InstanceID, v.Host)
	case rec.Incarnation != "" && v.Incarnation != rec.Incarnation:
		return nil, agentError(fmt.Errorf("vtpm %s of incarnation %s: %w", rec.InstanceID, rec.Incarnation, store.ErrNotFound))
	case v.Desired != store.DesiredRunning && !revertingHostSecret(v):
		return nil, refusal.Conflict(api.CodeConflict, "A vTPM's secret is released only while it is to run.")
	}
	if vtpms.OwnerHeld(r.kr, v.Spec) {
		var s keyring.Secret
		err := r.st.Update(ctx, func(tx *store.Tx) (err error) {
			s, err = r.staged.TakeStaged(tx, v.SecretID, time.Now())
			return err
		})
		if errors.Is(err, keyring.ErrNotFound) {
			return nil, fmt.Errorf("%w: %w", agent.ErrNeedsOwner, errNeedsOwner(v))
		}
		if err != nil {
			return nil, err
		}
		rec.SecretID = v.SecretID
		return s.Payload, nil
	}
	s, err := r.kr.Get(keyring.AsService(ctx), v.SecretID)
	if err != nil {
		return nil, err
	}
	rec.SecretID = v.SecretID
	return s.Payload, nil
}

// Rekey implements agent.Records: the new secret is stored first, then the
// record points at it, then the old one is shredded (no state was ever
// encrypted with it; one that cannot be shredded now is reclaimed when the
// server starts).
func (r *Records) Rekey(ctx context.Context, rec *agent.Record, secret []byte, ev agent.Event) error {
	if len(secret) == 0 {
		return refusal.Invalid(api.CodeInvalidParameter, "The new secret is empty.")
	}
	var v *store.VTPM
	if err := r.st.View(ctx, func(tx *store.Tx) (err error) { v, err = current(tx, rec); return err }); err != nil {
		return agentError(err)
	}
	if vtpms.OwnerHeld(r.kr, v.Spec) {
		// Stored as vtpmd, the new secret would not be the owner's.
		return fmt.Errorf("%w: %w", agent.ErrNeedsOwner, errNeedsOwner(v))
	}
	ctx = keyring.AsService(ctx)
	var old string
	var generation int64
	id, err := keyring.CreateRecorded(ctx, r.kr, rec.Project, keyring.VTPMSecretName(rec.InstanceID), secret, func(id string) error {
		return r.st.Update(ctx, func(tx *store.Tx) error {
			v, err := current(tx, rec)
			if err != nil {
				return err
			}
			if len(v.EKs) > 0 || v.Desired != store.DesiredRunning {
				return refusal.Conflict(api.CodeConflict, "Only a vTPM not yet manufactured, and to run, can be given a new key.")
			}
			old, v.SecretID = v.SecretID, id
			if err := tx.UpdateVTPM(v); err != nil {
				return err
			}
			generation = v.Generation
			detail := "its key is secret " + id
			if ev.Detail != "" {
				detail = ev.Detail + "; " + detail
			}
			return tx.AppendEvent(store.Event{Actor: ev.Actor, InstanceID: v.InstanceID, Action: ev.Action, Detail: detail})
		})
	})
	if err != nil {
		return agentError(err)
	}
	rec.SecretID, rec.Generation = id, generation
	if err := keyring.Shred(ctx, r.kr, old); err != nil {
		r.log.Warn("shredding the unused vTPM secret", "instance", rec.InstanceID, "secret", old, "err", err)
	}
	return nil
}

// Resized implements agent.Records: the resize ends only if it is
// confirmed or reverted (a resize still pending is the user's to end).
func (r *Records) Resized(ctx context.Context, rec *agent.Record, ev agent.Event) error {
	var generation int64
	err := r.st.Update(ctx, func(tx *store.Tx) error {
		v, err := current(tx, rec)
		if err != nil {
			return err
		}
		if v.Resize == nil || v.Resize.Status != store.ResizeConfirming && v.Resize.Status != store.ResizeReverting {
			return refusal.Conflict(api.CodeConflict, "The vTPM has no confirmed or reverted resize to finish.")
		}
		v.Resize = nil
		if err := tx.UpdateVTPM(v); err != nil {
			return err
		}
		generation = v.Generation
		return tx.AppendEvent(store.Event{Actor: ev.Actor, InstanceID: v.InstanceID, Action: ev.Action, Detail: ev.Detail})
	})
	if err != nil {
		return agentError(err)
	}
	rec.Generation, rec.Resize = generation, ""
	return nil
}

// maxFindings bounds a drift report.
const maxFindings = 10000

// ReportDrift implements agent.Records.
func (r *Records) ReportDrift(ctx context.Context, host string, asked int64, findings []api.Finding) error {
	if asked < 1 || len(findings) > maxFindings {
		return refusal.Invalid(api.CodeInvalidParameter, "A drift report answers a request (asked ≥ 1) with at most 10000 findings.")
	}
	data, err := json.Marshal(findings)
	if err != nil {
		return err
	}
	return agentError(r.st.Update(ctx, func(tx *store.Tx) error { return tx.AnswerDrift(host, asked, data) }))
}

// AdoptionSecret implements agent.Records: the secret is released only to
// the host asked, while its request waits, and only the secret it names
// (or, when it names none, whichever the host's domain names, which must
// key no vTPM vtpmd manages).
func (r *Records) AdoptionSecret(ctx context.Context, host string, ask agent.AdoptionAsk, secretID string) ([]byte, error) {
	if !keyring.ValidID(secretID) {
		return nil, refusal.Invalid(api.CodeInvalidParameter, "A secret reference is a lowercase UUID.")
	}
	err := r.st.View(ctx, func(tx *store.Tx) error {
		a, err := tx.GetAdoption(host, ask.ID)
		switch {
		case err != nil:
			return err
		case a.Answer != nil:
			return refusal.Conflict(api.CodeConflict, "The adoption request is answered already.")
		case a.SecretID != "" && a.SecretID != secretID:
			return refusal.Forbidden(api.CodeForbidden, "The adoption request names another secret.")
		}
		return vtpms.NotManaged(tx, a.InstanceID, secretID)
	})
	if err != nil {
		return nil, agentError(err)
	}
	s, err := r.kr.Get(keyring.AsService(ctx), secretID)
	switch {
	case errors.Is(err, keyring.ErrNotFound):
		return nil, refusal.NotFound(api.CodeSecretNotFound, "The key manager has no secret "+secretID+".")
	case errors.Is(err, keyring.ErrForbidden):
		return nil, refusal.Forbidden(api.CodeSecretNeedsOwner, "The key manager refused vtpmd's service user secret "+secretID+
			": it is another project's (Nova's user or host secret security keeps it in the instance's project). "+
			"Grant vtpmd's service user read on it with a Barbican ACL (read.users), or, for Nova's deployment mode, have Nova and vtpmd share the service project; then adopt again.")
	case err != nil:
		return nil, err
	}
	return s.Payload, nil
}

// AnswerAdoption implements agent.Records.
func (r *Records) AnswerAdoption(ctx context.Context, host string, ask agent.AdoptionAsk, answer agent.Adoption) error {
	data, err := json.Marshal(answer.API())
	if err != nil {
		return err
	}
	return agentError(r.st.Update(ctx, func(tx *store.Tx) error { return tx.AnswerAdoption(host, ask.ID, data) }))
}

// TransferInput implements agent.Records: released only to the host
// asked, while its request waits, for the vTPM it names (that
// incarnation): placed on that host for an export or import; arriving on
// it for a receive (migrating to it, still placed on its source, or being
// unshelved onto it), with the record; leaving it for a discard (migrated
// away from it, or being shelved from it with its bundle kept), with the
// record and no secret; a step of a live migration, with the record (and
// for a send, whether the server cancelled it).
func (r *Records) TransferInput(ctx context.Context, host string, ask agent.TransferAsk) (*agent.TransferInput, error) {
	in := &agent.TransferInput{}
	var secretID string
	err := r.st.View(ctx, func(tx *store.Tx) error {
		x, err := tx.GetTransfer(host, ask.ID)
		switch {
		case err != nil:
			return err
		case x.Answered:
			return refusal.Conflict(api.CodeConflict, "The transfer request is answered already.")
		}
		v, err := tx.GetVTPM(x.InstanceID)
		switch {
		case err != nil:
			return err
		case v.Incarnation != x.Incarnation:
			return fmt.Errorf("vtpm %s of incarnation %s: %w", x.InstanceID, x.Incarnation, store.ErrNotFound)
		}
		switch x.Kind {
		case store.TransferReceive, store.TransferDiscard:
			if err := moving(tx, v, host, x.Kind); err != nil {
				return err
			}
			in.Record = record(v)
		case store.TransferPrepare, store.TransferSend, store.TransferSettle, store.TransferAbort:
			if err := migratingLive(tx, v, host, x.Kind); err != nil {
				return err
			}
			in.Record = record(v)
			if x.Kind == store.TransferSend {
				if in.Cancel, err = tx.TransferAsked(host, v.InstanceID, store.TransferCancel); err != nil {
					return err
				}
			}
		default:
			if v.Host != host {
				return refusal.Forbidden(api.CodeForbidden, "The vTPM of "+x.InstanceID+" is placed on another host.")
			}
		}
		if x.Kind == store.TransferImport || x.Kind == store.TransferReceive || x.Kind == store.TransferSend {
			in.Bundle = x.Bundle
		}
		// A live migration's source and a settling or aborting target
		// need no secret: only the target preparing to receive it does.
		if x.Kind == store.TransferExport || x.Kind == store.TransferImport || x.Kind == store.TransferReceive || x.Kind == store.TransferPrepare {
			secretID = v.SecretID
		}
		return nil
	})
	if err != nil || secretID == "" {
		return in, agentError(err)
	}
	s, err := r.kr.Get(ctx, secretID)
	if err != nil {
		return nil, err
	}
	in.Secret = s.Payload
	return in, nil
}

// moving refuses a receive of v by host unless v is migrating to host
// and still placed on its source, or being unshelved onto host; and a
// discard unless v migrated from host and is placed on its target, or is
// being shelved from host with its bundle kept.
func moving(tx *store.Tx, v *store.VTPM, host, kind string) error {
	m, err := tx.GetMigration(v.InstanceID)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	ours := m != nil && m.Incarnation == v.Incarnation
	switch {
	case kind == store.TransferReceive:
		if ours && m.Target == host && v.Host == m.Source && m.Step == store.MigrationImporting ||
			v.Phase == store.PhaseUnshelving && v.Host == host {
			return nil
		}
		return refusal.Forbidden(api.CodeForbidden, "The vTPM of "+v.InstanceID+" is not arriving on host "+host+".")
	case kind == store.TransferDiscard:
		if ours && m.Source == host && v.Host == m.Target && m.Step == store.MigrationCleaning {
			return nil
		}
		if v.Phase == store.PhaseShelving && v.Host == host {
			_, err := tx.GetShelved(v.InstanceID, v.Incarnation)
			if err == nil || !errors.Is(err, store.ErrNotFound) {
				return err
			}
		}
		return refusal.Forbidden(api.CodeForbidden, "The vTPM of "+v.InstanceID+" is not leaving host "+host+".")
	}
	return nil
}

// migratingLive refuses a step of a live migration of v by host unless v
// is live-migrating at that step with host in that part: a prepare by the
// target while the record names the source (step preparing), a send by
// the source (step sending), a settle by the target once the record names
// it (step cleaning), an abort by any host the record does not name.
func migratingLive(tx *store.Tx, v *store.VTPM, host, kind string) error {
	m, err := tx.GetMigration(v.InstanceID)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	if m != nil && m.Live && m.Incarnation == v.Incarnation {
		switch kind {
		case store.TransferPrepare:
			if m.Target == host && v.Host == m.Source && m.Step == store.MigrationPreparing {
				return nil
			}
		case store.TransferSend:
			if m.Source == host && v.Host == host && m.Step == store.MigrationSending {
				return nil
			}
		case store.TransferSettle:
			if m.Target == host && v.Host == host && m.Step == store.MigrationCleaning {
				return nil
			}
		}
	}
	// An abort may be carried out after the migration ended (its target's
	// agent was down): it releases no secret, and removes only what the
	// host prepared for a vTPM placed elsewhere.
	if kind == store.TransferAbort && v.Host != host {
		return nil
	}
	return refusal.Forbidden(api.CodeForbidden, "The vTPM of "+v.InstanceID+" is not live-migrating through host "+host+" at that step.")
}

// TakeTransfer implements agent.Records.
func (r *Records) TakeTransfer(ctx context.Context, host string, ask agent.TransferAsk) error {
	return agentError(r.st.Update(ctx, func(tx *store.Tx) error { return tx.TakeTransfer(host, ask.ID) }))
}

// AnswerTransfer implements agent.Records.
func (r *Records) AnswerTransfer(ctx context.Context, host string, ask agent.TransferAsk, answer agent.Transfer) error {
	a := answer.API()
	return agentError(r.st.Update(ctx, func(tx *store.Tx) error {
		return tx.AnswerTransfer(host, ask.ID, a.Bundle, string(a.Code), a.Message)
	}))
}

// current reads rec's vTPM as it is now: ErrNotFound if it is gone or
// another incarnation, ErrConflict if it changed since rec was read.
func current(tx *store.Tx, rec *agent.Record) (*store.VTPM, error) {
	v, err := tx.GetVTPM(rec.InstanceID)
	if err != nil {
		return nil, err
	}
	return v, unchanged(v, rec)
}

// unchanged says whether v is rec's vTPM as rec read it: ErrNotFound if
// it is another incarnation, ErrConflict if it changed since.
func unchanged(v *store.VTPM, rec *agent.Record) error {
	switch {
	case v.Incarnation != rec.Incarnation:
		return fmt.Errorf("vtpm %s of incarnation %s: %w", rec.InstanceID, rec.Incarnation, store.ErrNotFound)
	case v.Generation != rec.Generation:
		return fmt.Errorf("vtpm %s: %w", rec.InstanceID, store.ErrConflict)
	}
	return nil
}

// validObserved refuses an observed state no agent reports.
func validObserved(rec *agent.Record) error {
	switch rec.Phase {
	case agent.PhasePending, agent.PhaseProvisioning, agent.PhaseActive, agent.PhaseStopped, agent.PhaseDeleting, agent.PhaseError:
	default:
		return refusal.Invalid(api.CodeInvalidParameter, fmt.Sprintf("Phase %s is none of pending, provisioning, active, stopped, deleting, error.", refusal.Quote(string(rec.Phase))))
	}
	if rec.PID < 0 {
		return refusal.Invalid(api.CodeInvalidParameter, "A process id is 0 (none) or more.")
	}
	if len(rec.Reason) > 4096 {
		return refusal.Invalid(api.CodeInvalidParameter, "The reason is longer than 4096 bytes.")
	}
	for _, ek := range rec.EKs {
		if ek.Kind == "" || len(ek.PublicDER) == 0 {
			return refusal.Invalid(api.CodeInvalidParameter, "An endorsement key needs a kind and a public key.")
		}
	}
	return nil
}

func sameEK(a, b store.EK) bool {
	return a.Kind == b.Kind && a.Handle == b.Handle && a.NVIndex == b.NVIndex && slices.Equal(a.PublicDER, b.PublicDER) && slices.Equal(a.CertDER, b.CertDER)
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

func changes(ch *store.Changes) *agent.Changes {
	out := &agent.Changes{Revision: ch.Token, Reset: ch.Reset, Records: make([]*agent.Record, len(ch.VTPMs)),
		Drift: agent.DriftAsk{ID: ch.DriftAsked, Repair: ch.DriftRepair}}
	for i, v := range ch.VTPMs {
		out.Records[i] = record(v)
	}
	for _, g := range ch.Gone {
		out.Gone = append(out.Gone, agent.Gone{InstanceID: g.InstanceID, Incarnation: g.Incarnation})
	}
	for _, a := range ch.Adoptions {
		out.Adoptions = append(out.Adoptions, agent.AdoptionAsk{ID: a.ID, InstanceID: a.InstanceID, Domain: a.Domain, SecretID: a.SecretID})
	}
	for _, x := range ch.Transfers {
		out.Transfers = append(out.Transfers, agent.TransferAsk{ID: x.ID, InstanceID: x.InstanceID, Incarnation: x.Incarnation,
			Kind: agent.TransferKind(x.Kind), Generation: x.Generation})
	}
	return out
}

func record(v *store.VTPM) *agent.Record {
	r := &agent.Record{InstanceID: v.InstanceID, Incarnation: v.Incarnation, Project: v.Project, Spec: v.Spec, Host: v.Host,
		Domain: v.Domain, Desired: agent.Desired(v.Desired), Phase: agent.Phase(v.Phase), Reason: v.Reason, SecretID: v.SecretID,
		Sockets: api.Sockets{Data: v.Sockets.Data, Ctrl: v.Sockets.Ctrl}, PID: v.PID, Connected: v.Connected, Resize: resizeStep(v.Resize),
		Generation: v.Generation}
	for _, ek := range v.EKs {
		r.EKs = append(r.EKs, agent.EK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: ek.PublicDER, CertDER: ek.CertDER})
	}
	return r
}

// resizeStep is what rz asks of the vTPM's host: something only of a
// resize to a new TPM.
func resizeStep(rz *store.Resize) agent.ResizeStep {
	if rz == nil || rz.Kind != spec.ResizeNewTPM {
		return ""
	}
	switch rz.Status {
	case store.ResizeConfirming:
		return agent.ResizeDiscard
	case store.ResizeReverting:
		return agent.ResizeRestore
	}
	return agent.ResizeSetAside
}

func eksRow(eks []agent.EK) []store.EK {
	var out []store.EK
	for _, ek := range eks {
		out = append(out, store.EK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: ek.PublicDER, CertDER: ek.CertDER})
	}
	return out
}

// revertingHostSecret says v's reverted resize asks its host to put back
// an old TPM whose secret the host keeps (secret security host).
func revertingHostSecret(v *store.VTPM) bool {
	return v.Resize != nil && v.Resize.Status == store.ResizeReverting && v.Spec.SecretSecurity == spec.HostMode
}
