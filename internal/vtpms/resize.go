package vtpms

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// Resize resizes the vTPM of instance id to the flavor and image req names,
// on the host it is on, with Nova's semantics (spec.Resize decides the
// kind; docs/request-semantics.md has the whole story):
//
//   - keep (same version and model): the spec changes, the state stays.
//   - new_tpm (another version or model): a new secret is made and the
//     record points at it with no endorsement keys, so that the host's
//     agent sets the old TPM's state aside and makes a new TPM; the old
//     secret, keys and spec stay in the record's resize until confirm.
//   - add (no vTPM before): a vTPM is made as a create makes one, on
//     req.Host when it is set (the instance's host), else placed.
//   - remove (no vTPM after): the vTPM is stopped, its state and secret
//     kept until confirm.
//
// Refused, before anything changes: a vTPM with a resize pending
// (resize_pending), being deleted (conflict), in a phase other than active
// or stopped (invalid_phase); a host that is down (host_unavailable), that
// lacks a trait the new vTPM needs (resize_needs_migration: moving the
// instance is cold migration's), or whose backend cannot keep an old TPM
// beside a new one (not_supported); and the spec.Resize refusals.
func (s *Service) Resize(ctx context.Context, c tenant.Caller, id string, req api.ResizeRequest) (*store.VTPM, error) {
	id, err := ParseInstanceID(id)
	if err != nil {
		return nil, err
	}
	to, err := s.Resolve(req.ResolveRequest)
	if err != nil {
		return nil, err
	}
	var v *store.VTPM
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { v, err = tx.GetVTPM(id); return err })
	switch {
	case errors.Is(err, store.ErrNotFound):
		return s.resizeAdd(ctx, c, id, to, req)
	case err != nil:
		return nil, err
	case !c.Sees(v.Project):
		return nil, fmt.Errorf("vtpm %s: %w", id, store.ErrNotFound)
	}
	if err := resizable(v); err != nil {
		return nil, err
	}
	if err := s.cfg.Store.View(ctx, func(tx *store.Tx) error { return notMigrating(tx, id) }); err != nil {
		return nil, err
	}
	from := v.Spec
	kind, err := spec.Resize(&from, to)
	if err != nil {
		return nil, err
	}
	if kind != spec.ResizeRemove {
		if err := s.canServe(ctx, v.Host, to, kind); err != nil {
			return nil, err
		}
	}
	rz := &store.Resize{Status: store.ResizeResized, Kind: kind, From: &from, To: to, RequestedAt: s.cfg.Now().UTC()}
	ev := store.Event{Actor: c.Actor, InstanceID: id, Action: "resize requested", Detail: resizeDetail(rz)}
	switch kind {
	case spec.ResizeKeep:
		v.Spec, v.Resize = *to, rz
	case spec.ResizeRemove:
		rz.OldDesired = v.Desired
		v.Desired, v.Resize = store.DesiredStopped, rz
	case spec.ResizeNewTPM:
		kctx, err := s.asOwner(ctx, c, v.Project, *to)
		if err != nil {
			return nil, err
		}
		return v, s.resizeNewTPM(kctx, v, to, rz, ev)
	}
	return v, s.write(ctx, v, ev)
}

// resizable refuses a resize the vTPM's state does not allow: not while
// it is shelved (vtpm_shelved).
func resizable(v *store.VTPM) error {
	if err := onShelf(v); err != nil {
		return err
	}
	switch {
	case v.Resize != nil:
		return refusal.Conflict(api.CodeResizePending, fmt.Sprintf(
			"A resize of the vTPM (%s) awaits confirm or revert; confirm or revert it before resizing again.", v.Resize.Kind))
	case v.Desired == store.DesiredDeleted:
		return errDeleting
	case v.Phase != store.PhaseActive && v.Phase != store.PhaseStopped:
		return refusal.Conflict(api.CodeInvalidPhase, fmt.Sprintf(
			"The vTPM is %s; a resize needs it active or stopped.", v.Phase))
	}
	return nil
}

// canServe refuses a resize to sp that the vTPM's host cannot carry out
// where it is.
func (s *Service) canServe(ctx context.Context, host string, sp *spec.Spec, kind spec.ResizeKind) error {
	hosts, err := s.Hosts(ctx, host)
	if err != nil {
		return err
	}
	if len(hosts) == 0 {
		return fmt.Errorf("host %s of a vTPM: %w", host, store.ErrNotFound)
	}
	h := hosts[0]
	if h.State == spec.HostDown {
		return refusal.Unavailable(api.CodeHostUnavailable, "Host "+host+" is down: its agent would not carry out the resize. Retry once it is up.")
	}
	if lacks := spec.NewTraitSet(h.Traits...).Missing(sp.RequiredTraits()); len(lacks) > 0 {
		return refusal.Conflict(api.CodeResizeNeedsMigration, fmt.Sprintf(
			"Host %s lacks %s, which the resized vTPM needs: migrate the vTPM to a host that has it first (vtpmctl migrate INSTANCE --to HOST), then resize it there.",
			host, strings.Join(lacks, ", ")))
	}
	if kind == spec.ResizeNewTPM && h.Backend != "swtpm" && h.Backend != "libvirt" {
		return refusal.Conflict(api.CodeNotSupported, "Host "+host+" runs the "+h.Backend+
			" backend, which cannot keep a vTPM's old TPM beside a new one; only the swtpm and libvirt backends resize to another TPM version or model.")
	}
	return nil
}

// resizeNewTPM gives v a new secret, made as the identity ctx carries
// (asOwner), and no endorsement keys, keeping the old ones in rz, so that
// its agent makes a new TPM and keeps the old.
func (s *Service) resizeNewTPM(ctx context.Context, v *store.VTPM, to *spec.Spec, rz *store.Resize, ev store.Event) error {
	payload, err := keyring.NewVTPMSecret()
	if err != nil {
		return err
	}
	rz.OldSecretID, rz.OldEKs = v.SecretID, v.EKs
	_, err = keyring.CreateRecorded(ctx, s.cfg.Keyring, v.Project, keyring.VTPMSecretName(v.InstanceID), payload, func(secretID string) error {
		v.Spec, v.SecretID, v.EKs, v.Resize = *to, secretID, nil, rz
		v.Phase, v.Reason, v.Sockets, v.PID, v.Connected = store.PhasePending, "", store.Sockets{}, 0, false
		if !OwnerHeld(s.cfg.Keyring, *to) {
			return s.write(ctx, v, ev)
		}
		return s.write(ctx, v, ev, func(tx *store.Tx) error { return s.stage(tx, v, payload) })
	})
	return err
}

// resizeAdd gives instance id, which has no vTPM, the one to spec: made as
// a create makes one, on req.Host when that is set.
func (s *Service) resizeAdd(ctx context.Context, c tenant.Caller, id string, to *spec.Spec, req api.ResizeRequest) (*store.VTPM, error) {
	kind, err := spec.Resize(nil, to)
	if err != nil {
		return nil, err
	}
	project, err := c.Owner(req.Project, "vTPMs", true)
	if err != nil {
		return nil, err
	}
	kctx, err := s.asOwner(ctx, c, project, *to)
	if err != nil {
		return nil, err
	}
	host, err := s.place(ctx, id, to, req.Host)
	if err != nil {
		return nil, err
	}
	rz := &store.Resize{Status: store.ResizeResized, Kind: kind, To: to, RequestedAt: s.cfg.Now().UTC()}
	v := &store.VTPM{InstanceID: id, Project: project, Spec: *to, Host: host,
		Desired: store.DesiredRunning, Phase: store.PhasePending, Resize: rz}
	err = s.record(kctx, v, req.Host, store.Event{Actor: c.Actor, InstanceID: id, Action: "resize requested",
		Detail: resizeDetail(rz) + " on host " + host})
	if err != nil {
		return nil, fmt.Errorf("resizing instance %s to a vTPM: %w", id, err)
	}
	return v, nil
}

// ConfirmResize makes the vTPM's pending resize final:
//
//   - keep, add: the resize record goes; nothing else changes.
//   - new_tpm: once the host's agent has made the new TPM (the vTPM is
//     active or stopped; resize_in_progress before), the old TPM's
//     secret is shredded at once and the agent removes its state.
//   - remove: the vTPM is deleted as Delete deletes one, secret first.
//
// No resize pending is no_resize_pending; one already confirming or
// reverting is resize_in_progress.
func (s *Service) ConfirmResize(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
	var v *store.VTPM
	err := keyring.ShredRecorded(ctx, s.cfg.Keyring, func() ([]string, error) {
		var err error
		if v, err = s.pendingResize(ctx, c, id); err != nil {
			return nil, err
		}
		ev := store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "resize confirmed"}
		var shred []string
		switch v.Resize.Kind {
		case spec.ResizeKeep, spec.ResizeAdd:
			v.Resize = nil
		case spec.ResizeNewTPM:
			if v.Phase != store.PhaseActive && v.Phase != store.PhaseStopped {
				return nil, refusal.Conflict(api.CodeResizeInProgress, fmt.Sprintf(
					"Host %s's agent has not made the new TPM yet (the vTPM is %s); confirm once it is active or stopped, or revert.", v.Host, v.Phase))
			}
			shred = []string{v.Resize.OldSecretID}
			v.Resize.Status, v.Resize.OldSecretID, v.Resize.OldEKs = store.ResizeConfirming, "", nil
			ev.Detail = "the old TPM's secret is shredded; host " + v.Host + "'s agent removes its state"
		case spec.ResizeRemove:
			shred = []string{v.SecretID}
			v.Desired, v.Resize = store.DesiredDeleted, nil
			ev.Detail = "the new flavor has no vTPM: its secret is shredded and the vTPM deleted"
		}
		return shred, s.write(ctx, v, ev)
	})
	if err != nil {
		return nil, err
	}
	return v, nil
}

// RevertResize undoes the vTPM's pending resize, restoring exactly the
// vTPM it had (never shredding the secret of the old TPM: Nova once did,
// and left instances that could not boot):
//
//   - keep: the old spec is back; the state never changed.
//   - new_tpm: the record points at the old TPM again (spec, secret,
//     endorsement keys), the new TPM's secret is shredded, and the host's
//     agent removes the new TPM's state and puts the old one back.
//   - add: the vTPM the resize made is deleted, secret first (gone true
//     when no agent had acted on it yet, and its record went at once).
//   - remove: what was asked of the vTPM before (run or stay stopped)
//     is asked again.
//
// No resize pending is no_resize_pending; one already confirming or
// reverting is resize_in_progress.
func (s *Service) RevertResize(ctx context.Context, c tenant.Caller, id string) (v *store.VTPM, gone bool, err error) {
	err = keyring.ShredRecorded(ctx, s.cfg.Keyring, func() ([]string, error) {
		var err error
		if v, err = s.pendingResize(ctx, c, id); err != nil {
			return nil, err
		}
		rz := v.Resize
		ev := store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "resize reverted"}
		switch rz.Kind {
		case spec.ResizeKeep:
			v.Spec, v.Resize = *rz.From, nil
			ev.Detail = "back to " + tpmName(rz.From)
		case spec.ResizeRemove:
			v.Desired, v.Resize = rz.OldDesired, nil
			ev.Detail = "back to " + tpmName(rz.From) + ", " + string(rz.OldDesired)
		case spec.ResizeNewTPM:
			shred := []string{v.SecretID}
			v.Spec, v.SecretID, v.EKs = *rz.From, rz.OldSecretID, rz.OldEKs
			v.Phase, v.Reason, v.Sockets, v.PID, v.Connected = store.PhasePending, "", store.Sockets{}, 0, false
			rz.Status, rz.OldSecretID, rz.OldEKs = store.ResizeReverting, "", nil
			ev.Detail = "back to the old " + tpmName(rz.From) + "; the new TPM's secret is shredded, and host " + v.Host + "'s agent puts the old TPM back"
			return shred, s.write(ctx, v, ev)
		case spec.ResizeAdd:
			ev.Detail = "the old flavor had no vTPM: its secret is shredded and the vTPM deleted"
			err := s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
				if gone, err = untouched(tx, v); err != nil {
					return err
				}
				v.Desired, v.Resize = store.DesiredDeleted, nil
				if gone {
					return deleteRecord(tx, v.InstanceID, ev)
				}
				if err := tx.UpdateVTPM(v); err != nil {
					return err
				}
				return tx.AppendEvent(ev)
			})
			return []string{v.SecretID}, err
		}
		return nil, s.write(ctx, v, ev)
	})
	if err != nil {
		return nil, false, err
	}
	return v, gone, nil
}

// pendingResize reads the vTPM of id with a resize awaiting confirm or
// revert.
func (s *Service) pendingResize(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return nil, err
	}
	switch {
	case v.Resize == nil:
		return nil, refusal.Conflict(api.CodeNoResizePending, "The vTPM has no resize to confirm or revert.")
	case v.Resize.Status != store.ResizeResized:
		return nil, refusal.Conflict(api.CodeResizeInProgress, fmt.Sprintf(
			"The vTPM's resize is %s already: host %s's agent is finishing it.", v.Resize.Status, v.Host))
	}
	return v, nil
}

// write records v, read in an earlier transaction (refused with a
// conflict if it changed since), and ev, and runs also in the same
// transaction.
func (s *Service) write(ctx context.Context, v *store.VTPM, ev store.Event, also ...func(*store.Tx) error) error {
	return s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		if err := tx.UpdateVTPM(v); err != nil {
			return err
		}
		for _, f := range also {
			if err := f(tx); err != nil {
				return err
			}
		}
		return tx.AppendEvent(ev)
	})
}

// resizeDetail says what a resize does, for its event.
func resizeDetail(rz *store.Resize) string {
	switch rz.Kind {
	case spec.ResizeKeep:
		return fmt.Sprintf("from %s to %s: the state is kept", tpmName(rz.From), tpmName(rz.To))
	case spec.ResizeNewTPM:
		return fmt.Sprintf("from %s to %s: a new TPM; the old one is kept until the resize is confirmed or reverted", tpmName(rz.From), tpmName(rz.To))
	case spec.ResizeAdd:
		return fmt.Sprintf("from no vTPM to %s: a new vTPM, deleted if the resize is reverted", tpmName(rz.To))
	default:
		return fmt.Sprintf("from %s to no vTPM: stopped, deleted when the resize is confirmed", tpmName(rz.From))
	}
}

// tpmName is "TPM 2.0 tpm-crb (secret security user)".
func tpmName(s *spec.Spec) string {
	return fmt.Sprintf("TPM %s %s (secret security %s)", s.Version, s.Model, s.SecretSecurity)
}
