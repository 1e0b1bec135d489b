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

// Migrate moves the vTPM of instance id, cold, to host target, or when
// target is "" to the host placement chooses among the others (the
// operator's: hosts are not a project's to pick). It runs the steps of
// store.Migration, each recorded before the next begins, so that running
// the same Migrate again after any crash (of this server, or of either
// host's agent) continues from the step recorded:
//
//  1. stopping: the vTPM is asked to stop (as Nova powers the guest off)
//     and awaited stopped on its host, the source; a vTPM stopped already
//     begins at the next step;
//  2. exporting: the source's agent exports the state as a bundle of a
//     new generation, which the server opens with the vTPM's secret and
//     keeps in the migration's row;
//  3. importing: the target's agent imports the bundle and proves that it
//     opens as the vTPM's TPM (the endorsement keys swtpm holds in it are
//     the record's); only then does the record switch to the target, in
//     the same transaction as the step after, and the vTPM is wanted
//     running again there if it was before;
//  4. cleaning: the source's agent removes its copy, and the migration's
//     row goes.
//
// A step's request to an agent (store.Transfer) is asked in the
// transaction that records the step, and the answered request of the step
// before is withdrawn there too: an agent is woken as soon as its step is
// recorded, and a step costs one round trip to one agent and one
// transaction. A step entered without its request (the same Migrate run
// again, or the step's host down when it was recorded) asks it first.
//
// Until the record switches, the source's copy is the vTPM (and a copy the
// target took in is not used); from then on, the target's. Events:
// "migration started", "migration exported", "migration imported",
// "migrated", "migration failed" (the step and why), "migration
// abandoned" (a backend that moves no state).
func (s *Service) Migrate(ctx context.Context, c tenant.Caller, id, target string) (*store.VTPM, error) {
	if c.Project != "" {
		return nil, refusal.Forbidden(api.CodeForbidden, "Moving a vTPM between hosts is the operator's: a project cannot migrate one.")
	}
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return nil, err
	}
	var m *store.Migration
	var ask *store.Transfer // the request of m's step, asked as the step was recorded
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { m, err = tx.GetMigration(v.InstanceID); return err })
	switch {
	case errors.Is(err, store.ErrNotFound):
		if m, ask, err = s.beginMigration(ctx, c, v, target); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	case m.Live:
		return nil, refusal.Conflict(api.CodeMigrationInProgress, migratingMessage(m))
	case target != "" && target != m.Target:
		return nil, refusal.Conflict(api.CodeMigrationInProgress, fmt.Sprintf("The vTPM of %s is migrating to host %s (step %s); "+
			"migrate it again without naming a host, or naming %s, to finish that move first.", v.InstanceID, m.Target, m.Step, m.Target))
	}
	for {
		step := m.Step
		switch step {
		case store.MigrationStopping:
			ask, err = s.migrationStop(ctx, c, m)
		case store.MigrationExporting:
			ask, err = s.migrationExport(ctx, c, v, m, ask)
		case store.MigrationImporting:
			ask, err = s.migrationImport(ctx, c, m, ask)
		case store.MigrationCleaning:
			var moved *store.VTPM
			if moved, err = s.migrationClean(ctx, c, m, ask); err == nil {
				return moved, nil
			}
		default:
			err = fmt.Errorf("migration of %s at an unknown step %q", v.InstanceID, step)
		}
		if err != nil {
			if rerr := (*refusal.Error)(nil); errors.As(err, &rerr) && rerr.Code == api.CodeNotSupported && step != store.MigrationCleaning {
				return nil, s.abandonMigration(ctx, c, m, err)
			}
			s.event(ctx, c, v, "migration failed", fmt.Sprintf("step %s, from host %s to host %s: %s; migrate again to continue",
				step, m.Source, m.Target, refusal.Truncate(err.Error())))
			return nil, err
		}
	}
}

// beginMigration chooses the target of a migration of v (target, or one
// placement chooses) and records the migration in one transaction: at its
// first step, with v asked to stop (a start asked meanwhile conflicts); or,
// when v is stopped already (desired and observed), at exporting, with the
// source's export asked. It returns the migration and the request asked,
// if any.
func (s *Service) beginMigration(ctx context.Context, c tenant.Caller, v *store.VTPM, target string) (*store.Migration, *store.Transfer, error) {
	if err := onShelf(v); err != nil {
		return nil, nil, err
	}
	switch {
	case v.Desired == store.DesiredDeleted:
		return nil, nil, errDeleting
	case v.Resize != nil:
		return nil, nil, refusal.Conflict(api.CodeResizePending, fmt.Sprintf(
			"A resize of the vTPM (%s) awaits confirm or revert; confirm or revert it before migrating.", v.Resize.Kind))
	case len(v.EKs) == 0:
		return nil, nil, refusal.Conflict(api.CodeNotManufactured, "The vTPM of "+v.InstanceID+" has no TPM yet: nothing to migrate; delete it and create it where it is wanted.")
	case target == v.Host:
		return nil, nil, refusal.Invalid(api.CodeTargetIsSource, "The vTPM of "+v.InstanceID+" is on host "+target+" already.")
	}
	stopped := v.Desired == store.DesiredStopped && v.Phase == store.PhaseStopped
	m := &store.Migration{InstanceID: v.InstanceID, Incarnation: v.Incarnation, Source: v.Host, Step: store.MigrationStopping,
		WasRunning: v.Desired == store.DesiredRunning, Actor: c.Actor}
	detail := "stopped for the move"
	if stopped {
		m.Step, detail = store.MigrationExporting, "stopped already"
	}
	var ask *store.Transfer
	var moving store.VTPM
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		ask, moving = nil, *v
		all, err := s.hosts(tx, "")
		if err != nil {
			return err
		}
		if !slices.ContainsFunc(all, func(h Host) bool { return h.Name == v.Host && h.State != spec.HostDown }) {
			return hostDown(v.Host)
		}
		if m.Target, err = migrationTarget(all, v, target); err != nil {
			return err
		}
		if err := tx.StartMigration(m); err != nil {
			return err
		}
		if stopped {
			// Nothing of the record changes: it must be as read.
			if err := unchanged(tx, v); err != nil {
				return err
			}
			if ask, err = askExport(tx, m); err != nil {
				return err
			}
		} else {
			moving.Desired = store.DesiredStopped
			if err := tx.UpdateVTPM(&moving); err != nil {
				return err
			}
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "migration started",
			Detail: fmt.Sprintf("from host %s to host %s; %s", m.Source, m.Target, detail)})
	})
	if errors.Is(err, store.ErrExists) || errors.Is(err, store.ErrConflict) {
		return nil, nil, refusal.Conflict(api.CodeMigrationInProgress, "The vTPM of "+v.InstanceID+
			" changed while its migration began (another one began, say); migrate it again.")
	}
	if err != nil {
		return nil, nil, err
	}
	*v = moving
	s.cfg.Log.Info("migrating a vTPM", "instance", v.InstanceID, "from", m.Source, "to", m.Target, "by", c.Actor)
	return m, ask, nil
}

// unchanged refuses, with store.ErrConflict, to go on with v if its record
// changed since v was read.
func unchanged(tx *store.Tx, v *store.VTPM) error {
	cur, err := tx.GetVTPM(v.InstanceID)
	if err != nil {
		return err
	}
	if cur.Incarnation != v.Incarnation || cur.Generation != v.Generation {
		return fmt.Errorf("vtpm %s changed since it was read: %w", v.InstanceID, store.ErrConflict)
	}
	return nil
}

// migrationTarget is the host v migrates to: target, which must be
// registered, of v's backend and take new vTPMs with v's traits; or, when
// target is "", the one placement chooses among the hosts of v's backend
// other than v's (no_valid_host when none fits).
func migrationTarget(all []Host, v *store.VTPM, target string) (string, error) {
	backend := ""
	for _, h := range all {
		if h.Name == v.Host {
			backend = h.Backend
		}
	}
	var cands []spec.Host
	for _, h := range all {
		if h.Name == v.Host || target != "" && h.Name != target {
			continue
		}
		if h.Backend != backend {
			if target != "" {
				return "", refusal.Conflict(api.CodeNotSupported, fmt.Sprintf("Host %s runs the %s backend and host %s the %s backend: "+
					"a vTPM's state moves between hosts of one backend.", target, h.Backend, v.Host, backend))
			}
			continue
		}
		cands = append(cands, spec.Host{Name: h.Name, Traits: spec.NewTraitSet(h.Traits...), Free: h.Capacity - h.Used, State: h.State})
	}
	if target != "" && len(cands) == 0 {
		return "", refusal.NotFound(api.CodeNotFound, "No such host: "+refusal.Quote(target)+".")
	}
	h, err := spec.Place(cands, v.Spec.RequiredTraits())
	if err != nil {
		return "", err
	}
	return h.Name, nil
}

// migrationStop awaits m's vTPM stopped on its source (asked when m
// began), up to Config.DriftTimeout, then moves m on to exporting, with
// the export asked if the source is up.
func (s *Service) migrationStop(ctx context.Context, c tenant.Caller, m *store.Migration) (*store.Transfer, error) {
	wait, cancel := context.WithTimeout(ctx, s.cfg.DriftTimeout)
	defer cancel()
	v, _, err := s.Watch(ctx, c, m.InstanceID, func(v *store.VTPM) bool {
		return v.Phase != store.PhaseStopped && v.Phase != store.PhaseError
	}, wait.Done())
	switch {
	case err != nil:
		return nil, err
	case v.Phase == store.PhaseError:
		return nil, refusal.Conflict(api.CodeConflict, "The vTPM of "+m.InstanceID+" failed to stop on host "+m.Source+": "+v.Reason)
	case v.Phase != store.PhaseStopped && ctx.Err() != nil:
		return nil, ctx.Err()
	case v.Phase != store.PhaseStopped:
		return nil, refusal.Unavailable(api.CodeHostUnavailable, fmt.Sprintf("The vTPM of %s did not stop on host %s within %s: is its agent running (vtpmctl hosts)?",
			m.InstanceID, m.Source, s.cfg.DriftTimeout))
	}
	return s.advance(ctx, c, m, store.MigrationExporting, nil, "", "", func(tx *store.Tx) (*store.Transfer, error) {
		if up, err := s.isUp(tx, m.Source); err != nil || !up {
			return nil, err
		}
		return askExport(tx, m)
	})
}

// askExport asks the source's agent of m to export the vTPM as a bundle
// of a new generation.
func askExport(tx *store.Tx, m *store.Migration) (*store.Transfer, error) {
	gen, err := tx.HandOutGeneration(m.InstanceID, m.Incarnation)
	if err != nil {
		return nil, err
	}
	ask := &store.Transfer{Host: m.Source, InstanceID: m.InstanceID, Incarnation: m.Incarnation, Kind: store.TransferExport, Generation: gen}
	return ask, tx.AskTransfer(ask)
}

// migrationExport awaits the source's export of m's vTPM v (asking it
// first when ask is nil), opens the bundle as v's, with v's secret read
// from the key manager meanwhile, and keeps it in m, moved on to
// importing, with the target's receive asked if the target is up.
func (s *Service) migrationExport(ctx context.Context, c tenant.Caller, v *store.VTPM, m *store.Migration, ask *store.Transfer) (_ *store.Transfer, err error) {
	if ask == nil {
		err := s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
			if err := s.hostUpIn(tx, m.Source); err != nil {
				return err
			}
			ask, err = askExport(tx, m)
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	defer s.withdrawUnless(ctx, ask, &err)
	secret := meanwhile(func() ([]byte, error) { return s.secret(ctx, v) })
	got, err := s.awaitTransfer(ctx, ask)
	if err != nil {
		return nil, err
	}
	sec, err := secret()
	if err != nil {
		return nil, err
	}
	if err := openWith(v, sec, got.Bundle, ask.Generation); err != nil {
		return nil, err
	}
	m.Generation, m.Bundle = ask.Generation, got.Bundle
	return s.advance(ctx, c, m, store.MigrationImporting, ask, "migration exported",
		fmt.Sprintf("generation %d, %d bytes, from host %s", m.Generation, len(m.Bundle), m.Source), func(tx *store.Tx) (*store.Transfer, error) {
			return s.askIfUp(tx, receiveOf(m))
		})
}

// receiveOf is the request that the target of m take in m's bundle.
func receiveOf(m *store.Migration) *store.Transfer {
	return &store.Transfer{Host: m.Target, InstanceID: m.InstanceID, Incarnation: m.Incarnation, Kind: store.TransferReceive,
		Generation: m.Generation, Bundle: m.Bundle}
}

// discardOf is the request that the source of m remove its copy.
func discardOf(m *store.Migration) *store.Transfer {
	return &store.Transfer{Host: m.Source, InstanceID: m.InstanceID, Incarnation: m.Incarnation, Kind: store.TransferDiscard, Generation: m.Generation}
}

// migrationImport awaits the target's receive of m's bundle, proven to be
// the vTPM's TPM (asking it first when ask is nil), then, in one
// transaction, switches the record to the target, wanted running there if
// it was before the move, moves m on to cleaning, and asks the source's
// agent to discard its copy if the source is up.
func (s *Service) migrationImport(ctx context.Context, c tenant.Caller, m *store.Migration, ask *store.Transfer) (_ *store.Transfer, err error) {
	if ask == nil {
		ask = receiveOf(m)
		err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
			if err := s.hostUpIn(tx, m.Target); err != nil {
				return err
			}
			return tx.AskTransfer(ask)
		})
		if err != nil {
			return nil, err
		}
	}
	defer s.withdrawUnless(ctx, ask, &err)
	if _, err := s.awaitTransfer(ctx, ask); err != nil {
		return nil, err
	}
	next, from := (*store.Transfer)(nil), m.Step
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		if err := tx.WithdrawTransfer(ask.ID); err != nil {
			return err
		}
		v, err := tx.GetVTPM(m.InstanceID)
		if err != nil {
			return err
		}
		if v.Incarnation != m.Incarnation || v.Host != m.Source {
			return fmt.Errorf("vtpm %s changed under its migration: %w", m.InstanceID, store.ErrConflict)
		}
		v.Host, v.Phase, v.Reason, v.Sockets, v.PID, v.Connected = m.Target, store.PhaseStopped, "", store.Sockets{}, 0, false
		if m.WasRunning {
			v.Desired = store.DesiredRunning
		}
		if err := tx.UpdateVTPM(v); err != nil {
			return err
		}
		// The target's copy is the vTPM now.
		cleaning := *m
		cleaning.Step, cleaning.Bundle = store.MigrationCleaning, nil
		if err := tx.AdvanceMigration(&cleaning, from); err != nil {
			return err
		}
		err = tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: m.InstanceID, Action: "migration imported",
			Detail: fmt.Sprintf("generation %d on host %s, its endorsement keys the record's; the vTPM is on host %s now", m.Generation, m.Target, m.Target)})
		if err != nil {
			return err
		}
		next, err = s.askIfUp(tx, discardOf(m))
		return err
	})
	if err != nil {
		return nil, err
	}
	m.Step, m.Bundle = store.MigrationCleaning, nil
	return next, nil
}

// migrationClean awaits the source's removal of its copy of m's vTPM
// (asking it first when ask is nil), ends m, and returns the vTPM as it
// is now, on the target.
func (s *Service) migrationClean(ctx context.Context, c tenant.Caller, m *store.Migration, ask *store.Transfer) (_ *store.VTPM, err error) {
	if ask == nil {
		ask = discardOf(m)
		err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
			if err := s.hostUpIn(tx, m.Source); err != nil {
				return fmt.Errorf("the vTPM of %s is on host %s; its old copy on host %s stays until migrate runs again with %s up: %w",
					m.InstanceID, m.Target, m.Source, m.Source, err)
			}
			return tx.AskTransfer(ask)
		})
		if err != nil {
			return nil, err
		}
	}
	defer s.withdrawUnless(ctx, ask, &err)
	if _, err := s.awaitTransfer(ctx, ask); err != nil {
		return nil, err
	}
	var v *store.VTPM
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		if err := tx.WithdrawTransfer(ask.ID); err != nil {
			return err
		}
		if err := tx.FinishMigration(m.InstanceID); err != nil {
			return err
		}
		err = tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: m.InstanceID, Action: "migrated",
			Detail: fmt.Sprintf("from host %s to host %s; the copy on host %s is removed", m.Source, m.Target, m.Source)})
		if err != nil {
			return err
		}
		v, err = tx.GetVTPM(m.InstanceID)
		return err
	})
	if err != nil {
		return nil, err
	}
	s.cfg.Log.Info("migrated a vTPM", "instance", m.InstanceID, "from", m.Source, "to", m.Target)
	return v, nil
}

// advance moves m on to step in one transaction with: the withdrawal of
// done, the answered request of the step m leaves, if any; an event
// (action, detail) saying what that step did, if any; and next, which asks
// the next step's request of its host when it is up. It returns the
// request next asked, or nil.
func (s *Service) advance(ctx context.Context, c tenant.Caller, m *store.Migration, step store.MigrationStep, done *store.Transfer,
	action, detail string, next func(*store.Tx) (*store.Transfer, error)) (*store.Transfer, error) {
	from := m.Step
	m.Step = step
	var asked *store.Transfer
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		if done != nil {
			if err := tx.WithdrawTransfer(done.ID); err != nil {
				return err
			}
		}
		if err := tx.AdvanceMigration(m, from); err != nil {
			return err
		}
		if action != "" {
			if err := tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: m.InstanceID, Action: action, Detail: detail}); err != nil {
				return err
			}
		}
		asked, err = next(tx)
		return err
	})
	if err != nil {
		m.Step = from
		return nil, err
	}
	return asked, nil
}

// noAsk is advance's next for a step that asks nothing in its transaction.
func noAsk(*store.Tx) (*store.Transfer, error) { return nil, nil }

// abandonMigration ends m, which a host's backend cannot carry out (it
// moves no state): the vTPM stays on its source, wanted running again if
// it was.
func (s *Service) abandonMigration(ctx context.Context, c tenant.Caller, m *store.Migration, why error) error {
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		v, err := tx.GetVTPM(m.InstanceID)
		if err != nil {
			return err
		}
		if m.WasRunning && v.Host == m.Source {
			v.Desired = store.DesiredRunning
			if err := tx.UpdateVTPM(v); err != nil {
				return err
			}
		}
		if err := tx.FinishMigration(m.InstanceID); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: m.InstanceID, Action: "migration abandoned",
			Detail: fmt.Sprintf("the vTPM stays on host %s: %s", m.Source, refusal.Truncate(why.Error()))})
	})
	return errors.Join(why, err)
}

// notMigrating refuses, with migration_in_progress, to change the vTPM
// instanceID while it migrates, cold or live, until its record names the
// target: a start or stop would act on a host it is leaving, a delete or a
// restore would leave its other copy behind.
func notMigrating(tx *store.Tx, instanceID string) error {
	m, err := tx.GetMigration(instanceID)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if slices.Contains([]store.MigrationStep{store.MigrationStopping, store.MigrationExporting, store.MigrationImporting,
		store.MigrationPreparing, store.MigrationSending}, m.Step) {
		return refusal.Conflict(api.CodeMigrationInProgress, migratingMessage(m))
	}
	return nil
}
