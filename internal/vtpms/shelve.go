package vtpms

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// Shelve puts vTPM id on the shelf: its state leaves its host as a sealed
// bundle (package bundle) the servers keep in the store until it is
// unshelved or deleted, and the host's copy goes; the record stays, on no
// host, phase shelved, its key-manager secret kept (the bundle opens only
// with it). The vTPM must be stopped (desired and observed): as Nova
// shelves an instance only once it is off, vtpmd does not stop it for the
// caller (vtpm_not_stopped).
//
// Each step is durable, and a crash at any leaves one usable copy that a
// new Shelve continues from:
//
//  1. phase shelving (the agent leaves the vTPM alone, a start is
//     refused): its state cannot change from here;
//  2. the host's agent exports the bundle; the server opens it with the
//     vTPM's secret and keeps it (skipped when kept already);
//  3. the host's agent removes its state (the libvirt or swtpm artefacts;
//     the secret stays);
//  4. the record leaves the host: phase shelved.
//
// Refused: already shelved (vtpm_shelved), being unshelved (vtpm_shelved),
// a resize awaiting confirm or revert (resize_pending), migrating
// (migration_in_progress), never manufactured (not_manufactured), its host down (host_unavailable),
// a backend that moves no state (not_supported). Events: "shelving",
// "shelve bundle kept", "shelved", or "shelve failed" with the reason.
func (s *Service) Shelve(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return nil, err
	}
	switch {
	case v.Phase == store.PhaseShelved:
		return nil, refusal.Conflict(api.CodeVTPMShelved, "The vTPM of "+v.InstanceID+" is shelved already.")
	case v.Phase == store.PhaseUnshelving:
		return nil, refusal.Conflict(api.CodeVTPMShelved, "The vTPM of "+v.InstanceID+" is being unshelved onto host "+v.Host+
			"; finish that first (vtpmctl unshelve).")
	case v.Phase == store.PhaseShelving:
	case len(v.EKs) == 0:
		return nil, refusal.Conflict(api.CodeNotManufactured, "The vTPM of "+v.InstanceID+" has no TPM yet: nothing to shelve.")
	case v.Desired != store.DesiredStopped || v.Phase != store.PhaseStopped:
		return nil, refusal.Conflict(api.CodeVTPMNotStopped, "The vTPM of "+v.InstanceID+" is "+string(v.Phase)+
			" (desired "+string(v.Desired)+"); stop it (vtpmctl stop) before shelving it.")
	}
	if err := s.settled(ctx, v); err != nil {
		return nil, err
	}
	if err := s.hostUp(ctx, v.Host); err != nil {
		return nil, err
	}
	from := v.Host
	if v.Phase != store.PhaseShelving {
		if v, err = s.setPhase(ctx, c, v, store.PhaseShelving, "shelving", "from host "+from); err != nil {
			return nil, err
		}
	}
	failed := func(err error) (*store.VTPM, error) {
		s.event(ctx, c, v, "shelve failed", refusal.Truncate(err.Error())+"; vtpmctl shelve again continues")
		return nil, err
	}
	if _, err := s.shelved(ctx, v); errors.Is(err, store.ErrNotFound) {
		gen, data, err := s.export(ctx, v)
		if err != nil {
			return failed(err)
		}
		sh := &store.Shelved{InstanceID: v.InstanceID, Incarnation: v.Incarnation, Generation: gen, Reason: store.ShelvedShelve,
			FromHost: from, CreatedAt: s.cfg.Now(), Bundle: data}
		err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
			if err := tx.RecordGeneration(v.InstanceID, v.Incarnation, gen); err != nil {
				return err
			}
			if err := tx.PutShelved(sh); err != nil {
				return err
			}
			return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "shelve bundle kept",
				Detail: fmt.Sprintf("generation %d, %d bytes, from host %s", gen, len(data), from)})
		})
		if err != nil {
			return failed(err)
		}
	} else if err != nil {
		return nil, err
	}
	rm := &store.Transfer{Host: from, InstanceID: v.InstanceID, Incarnation: v.Incarnation, Kind: store.TransferDiscard}
	if err := s.ask(ctx, rm); err != nil {
		return failed(err)
	}
	v, err = s.leaveHost(ctx, c, v, "shelved", "state removed from host "+from+"; the control plane keeps its bundle; its secret is kept")
	if err != nil {
		return nil, err
	}
	s.cfg.Log.Info("shelved vTPM", "instance", v.InstanceID, "from", from, "by", c.Actor)
	return v, nil
}

// Unshelve places shelved vTPM id on a host again, the one named (to) or
// the one the placement rules choose, and has its agent import the
// shelved bundle; the agent proves that the state is the vTPM's TPM (its
// endorsement keys are the record's) before it takes it. Only then is the
// record stopped there (or, for an evacuated vTPM, as it was asked to be:
// a running one starts) and the shelved bundle deleted: until that
// moment the bundle is the usable copy, and a crash at any step leaves
// it; a new Unshelve continues (onto the same host, or to one named).
//
// Refused: not shelved (vtpm_not_shelved), a resize pending or a
// migration under way (resize_pending, migration_in_progress; neither
// begins on a shelved vTPM), no host fits or has room
// (no_valid_host), the bundle not the vTPM's (bundle_corrupt,
// bundle_mismatch), the host's agent cannot import it (not_supported,
// transfer_failed). Events: "unshelving", "unshelved" (for an evacuated
// vTPM: what is lost), or "unshelve failed" with the reason.
func (s *Service) Unshelve(ctx context.Context, c tenant.Caller, id, to string) (*store.VTPM, error) {
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return nil, err
	}
	if to != "" && c.Project != "" {
		return nil, refusal.Forbidden(api.CodeForbidden, "Hosts are the operator's: a project cannot name one.")
	}
	return s.unshelve(ctx, c, v, to)
}

func (s *Service) unshelve(ctx context.Context, c tenant.Caller, v *store.VTPM, to string) (*store.VTPM, error) {
	if v.Phase != store.PhaseShelved && v.Phase != store.PhaseUnshelving {
		return nil, refusal.Conflict(api.CodeVTPMNotShelved, "The vTPM of "+v.InstanceID+" is "+string(v.Phase)+", not shelved.")
	}
	if err := s.settled(ctx, v); err != nil {
		return nil, err
	}
	sh, err := s.shelved(ctx, v)
	if err != nil {
		return nil, err
	}
	if err := s.openAs(ctx, v, sh.Bundle, sh.Generation); err != nil {
		s.event(ctx, c, v, "unshelve failed", refusal.Truncate(err.Error()))
		return nil, err
	}
	if v.Phase == store.PhaseShelved || to != "" && to != v.Host {
		if v, err = s.placeShelved(ctx, c, v, to, sh); err != nil {
			return nil, err
		}
	}
	if err := s.hostUp(ctx, v.Host); err != nil {
		return nil, err
	}
	in := &store.Transfer{Host: v.Host, InstanceID: v.InstanceID, Incarnation: v.Incarnation, Kind: store.TransferReceive,
		Generation: sh.Generation, Bundle: sh.Bundle}
	if err := s.ask(ctx, in); err != nil {
		s.event(ctx, c, v, "unshelve failed", fmt.Sprintf("on host %s: %s; vtpmctl unshelve again continues (--to another host)", v.Host, refusal.Truncate(err.Error())))
		return nil, err
	}
	detail := fmt.Sprintf("generation %d on host %s", sh.Generation, v.Host)
	if sh.Reason == store.ShelvedEvacuate {
		detail = fmt.Sprintf("evacuated from host %s to host %s from its backup of generation %d: what changed in the TPM after %s is lost",
			sh.FromHost, v.Host, sh.Generation, sh.CreatedAt.Format(time.RFC3339))
	}
	var done *store.VTPM
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		cur, err := tx.GetVTPM(v.InstanceID)
		if err != nil {
			return err
		}
		if cur.Incarnation != v.Incarnation || cur.Phase != store.PhaseUnshelving || cur.Host != v.Host {
			return refusal.Conflict(api.CodeConflict, "The vTPM of "+v.InstanceID+" changed while it was being unshelved.")
		}
		cur.Phase = store.PhaseStopped
		if err := tx.UpdateVTPM(cur); err != nil {
			return err
		}
		done = cur
		if err := tx.DeleteShelved(v.InstanceID, v.Incarnation); err != nil {
			return err
		}
		if sh.Reason == store.ShelvedEvacuate {
			how := fmt.Sprintf("restored from its backup of generation %d, its host %s gone", sh.Generation, sh.FromHost)
			if err := rebaseAttestation(tx, c.Actor, v.InstanceID, how); err != nil {
				return err
			}
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "unshelved", Detail: detail})
	})
	if err != nil {
		return nil, err
	}
	v = done
	s.cfg.Log.Info("unshelved vTPM", "instance", v.InstanceID, "host", v.Host, "generation", sh.Generation, "by", c.Actor)
	return v, nil
}

// placeShelved places v, shelved (sh), on host to or the one the
// placement rules choose (phase unshelving), where there is room; never
// back on the host it was evacuated from.
func (s *Service) placeShelved(ctx context.Context, c tenant.Caller, v *store.VTPM, to string, sh *store.Shelved) (*store.VTPM, error) {
	var placed *store.VTPM
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		cur, err := tx.GetVTPM(v.InstanceID)
		if err != nil {
			return err
		}
		if cur.Incarnation != v.Incarnation || cur.Phase != v.Phase {
			return refusal.Conflict(api.CodeConflict, "The vTPM of "+v.InstanceID+" changed meanwhile; try again.")
		}
		hosts, err := s.candidates(tx)
		if err != nil {
			return err
		}
		fit := hosts[:0]
		for _, h := range hosts {
			if to != "" && h.Name == to || to == "" && !(sh.Reason == store.ShelvedEvacuate && h.Name == sh.FromHost) {
				fit = append(fit, h)
			}
		}
		if to != "" && len(fit) == 0 {
			return refusal.NotFound(api.CodeNotFound, "No host "+refusal.Quote(to)+".")
		}
		hosts = fit
		h, err := spec.Place(hosts, v.Spec.RequiredTraits())
		if err != nil {
			return err
		}
		cur.Host, cur.Phase = h.Name, store.PhaseUnshelving
		if err := tx.UpdateVTPM(cur); err != nil {
			return err
		}
		placed = cur
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "unshelving",
			Detail: fmt.Sprintf("generation %d onto host %s", sh.Generation, cur.Host)})
	})
	return placed, err
}

// shelved reads v's shelved bundle; store.ErrNotFound if it has none.
func (s *Service) shelved(ctx context.Context, v *store.VTPM) (sh *store.Shelved, err error) {
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) error {
		sh, err = tx.GetShelved(v.InstanceID, v.Incarnation)
		return err
	})
	return sh, err
}

// setPhase records v in phase p if nobody changed it since it was read,
// with an event.
func (s *Service) setPhase(ctx context.Context, c tenant.Caller, v *store.VTPM, p store.Phase, action, detail string) (*store.VTPM, error) {
	return s.rewrite(ctx, c, v, func(next *store.VTPM) { next.Phase = p }, action, detail)
}

// rewrite records v changed by mutate if nobody changed it since it was
// read, with an event, and returns it as written.
func (s *Service) rewrite(ctx context.Context, c tenant.Caller, v *store.VTPM, mutate func(*store.VTPM), action, detail string) (*store.VTPM, error) {
	var next store.VTPM
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		next = *v // afresh at every attempt: UpdateVTPM bumps its generation
		mutate(&next)
		if err := tx.UpdateVTPM(&next); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: action, Detail: detail})
	})
	if errors.Is(err, store.ErrConflict) {
		return nil, refusal.Conflict(api.CodeConflict, "The vTPM of "+v.InstanceID+" changed meanwhile; try again.")
	}
	if err != nil {
		return nil, err
	}
	return &next, nil
}

// leaveHost takes v off its host: phase shelved, no host, served
// nowhere, with an event.
func (s *Service) leaveHost(ctx context.Context, c tenant.Caller, v *store.VTPM, action, detail string) (*store.VTPM, error) {
	return s.rewrite(ctx, c, v, offHost, action, detail)
}

// offHost makes v shelved: on no host, served nowhere.
func offHost(v *store.VTPM) {
	v.Host, v.Phase, v.Reason = "", store.PhaseShelved, ""
	v.Sockets, v.PID, v.Connected = store.Sockets{}, 0, false
}

// settled refuses to shelve, unshelve or evacuate v while a resize of it
// awaits confirm or revert (resize_pending) or it migrates
// (migration_in_progress). Either beginning after this read changes the
// record, and the move's own write conflicts.
func (s *Service) settled(ctx context.Context, v *store.VTPM) error {
	if v.Resize != nil {
		return refusal.Conflict(api.CodeResizePending, fmt.Sprintf(
			"A resize of the vTPM of %s (%s) awaits confirm or revert; confirm or revert it first.", v.InstanceID, v.Resize.Kind))
	}
	return s.cfg.Store.View(ctx, func(tx *store.Tx) error { return notMigrating(tx, v.InstanceID) })
}

// onShelf refuses, with vtpm_shelved, to migrate or resize v while it is
// shelved, or being shelved or unshelved.
func onShelf(v *store.VTPM) error {
	switch v.Phase {
	case store.PhaseShelving, store.PhaseShelved, store.PhaseUnshelving:
		return refusal.Conflict(api.CodeVTPMShelved, fmt.Sprintf("The vTPM of %s is %s: it moves or changes only once unshelved "+
			"(vtpmctl unshelve; a shelve cut short: vtpmctl shelve again first).", v.InstanceID, v.Phase))
	}
	return nil
}
