package vtpms

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// EvacuateLive moves every vTPM off host, which is up, with its state, as
// an operator does before maintenance (Nova's nova host-evacuate-live):
//
//  1. host is drained (Drain: nothing new is placed there; an event
//     names the caller if it was not drained already);
//  2. each vTPM on it moves to target, or when target is "" to the host
//     placement chooses among the others: one wanted running by live
//     migration (LiveMigrate), its guest running throughout
//     (live_migrated); one wanted stopped cold (Migrate: cold_migrated).
//     A shelved vTPM is on no host: not moved. One migrating, cold or
//     live, from or to host goes on with that migration, as the same
//     migrate or live-migrate would do (from host: to the target it
//     was going to, whatever target says; to host: it lands, then moves
//     off again);
//  3. a vTPM that cannot move is refused with its code (not_supported: a
//     running one on a backend that cannot migrate a running guest;
//     guest_not_running, no_valid_host, migration_in_progress,
//     resize_pending, vtpm_shelved, ...), and the others go on.
//
// concurrent vTPMs move at a time (0: one, as Nova's
// max_concurrent_live_migrations defaults to; at most evacuateWorkers),
// in the order of their instance ids. Doing it again continues: the
// vTPMs moved are on host no more, and a move cut short is resumed. Events
// on host: "drained", "evacuating live", "evacuated live". progress is as
// for Evacuate. Refusals, before anything changes: forbidden (a project),
// invalid_parameter (concurrent), not_found (host, target),
// target_is_source, host_unavailable (host down: vtpmctl host evacuate
// restores its vTPMs from their backups instead).
func (s *Service) EvacuateLive(ctx context.Context, c tenant.Caller, host, target string, concurrent int, progress func(api.EvacuationProgress)) (*api.Evacuation, error) {
	if c.Project != "" {
		return nil, refusal.Forbidden(api.CodeForbidden, "Hosts are the operator's: a project cannot evacuate one.")
	}
	if concurrent == 0 {
		concurrent = 1
	}
	if concurrent < 1 || concurrent > evacuateWorkers {
		return nil, refusal.Invalid(api.CodeInvalidParameter, fmt.Sprintf("max_concurrent is %d: from 1 to %d vTPMs move at a time.", concurrent, evacuateWorkers))
	}
	all, err := s.Hosts(ctx, "")
	if err != nil {
		return nil, err
	}
	at := slices.IndexFunc(all, func(h Host) bool { return h.Name == host })
	switch {
	case at < 0:
		return nil, refusal.NotFound(api.CodeNotFound, "No such host.")
	case target == host:
		return nil, refusal.Invalid(api.CodeTargetIsSource, "Host "+host+" is the host evacuated: name another, or none for placement to choose.")
	case target != "" && !slices.ContainsFunc(all, func(h Host) bool { return h.Name == target }):
		return nil, refusal.NotFound(api.CodeNotFound, "No such host: "+refusal.Quote(target)+".")
	case all[at].State == spec.HostDown:
		return nil, refusal.Unavailable(api.CodeHostUnavailable, "Host "+host+" is down: its agent cannot move its vTPMs. "+
			"If it is gone, vtpmctl host evacuate restores them on other hosts from their backups.")
	}
	if _, err := s.Drain(ctx, c, host, true); err != nil {
		return nil, err
	}
	var ids []string
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		vs, err := tx.ListVTPMs(store.Filter{Host: host})
		if err != nil {
			return err
		}
		moving, err := tx.ListMigrations(host)
		if err != nil {
			return err
		}
		ids = ids[:0]
		for _, v := range vs {
			ids = append(ids, v.InstanceID)
		}
		for _, m := range moving {
			if m.Source == host && !slices.Contains(ids, m.InstanceID) {
				ids = append(ids, m.InstanceID) // on its target already; its copy here not removed yet
			}
		}
		slices.Sort(ids)
		to := "the hosts placement chooses"
		if target != "" {
			to = "host " + target
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: store.HostKey(host), Action: "evacuating live",
			Detail: fmt.Sprintf("%d vTPMs on it or migrating from it, to %s, %d at a time", len(ids), to, concurrent)})
	})
	if err != nil {
		return nil, err
	}
	s.cfg.Log.Info("evacuating host live", "host", host, "vtpms", len(ids), "target", target, "concurrent", concurrent, "by", c.Actor)
	moves := make([]func() api.EvacuatedVTPM, 0, len(ids))
	for _, id := range ids {
		moves = append(moves, func() api.EvacuatedVTPM { return s.evacuateLive(ctx, c, host, id, target) })
	}
	out, err := evacuation(ctx, host, concurrent, moves, progress)
	if err != nil {
		return nil, err
	}
	detail := fmt.Sprintf("%d live-migrated, %d cold-migrated, %d refused",
		out.Count[api.EvacuatedLiveMigrated], out.Count[api.EvacuatedColdMigrated], out.Count[api.EvacuatedRefused])
	s.event(ctx, c, &store.VTPM{InstanceID: store.HostKey(host)}, "evacuated live", detail)
	s.cfg.Log.Info("evacuated host live", "host", host, "outcome", detail, "by", c.Actor)
	return out, nil
}

// evacuateLive moves the vTPM id off host, as EvacuateLive says.
func (s *Service) evacuateLive(ctx context.Context, c tenant.Caller, host, id, target string) api.EvacuatedVTPM {
	item := api.EvacuatedVTPM{InstanceID: id}
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return s.refused(item, err)
	}
	var m *store.Migration
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { m, err = tx.GetMigration(id); return err })
	switch {
	case errors.Is(err, store.ErrNotFound):
		m = nil
	case err != nil:
		return s.refused(item, err)
	}
	live, to := v.Desired == store.DesiredRunning, target
	if m != nil {
		live, to = m.Live, m.Target
		if m.Target == host {
			to = ""
		}
	}
	move, outcome := s.Migrate, api.EvacuatedColdMigrated
	if live {
		move, outcome = s.LiveMigrate, api.EvacuatedLiveMigrated
	}
	moved, err := move(ctx, c, id, to)
	switch {
	case err != nil:
		return s.refused(item, err)
	case moved.Host == host: // its migration to host finished: off again
		return s.evacuateLive(ctx, c, host, id, target)
	}
	item.Outcome, item.Host = outcome, moved.Host
	return item
}
