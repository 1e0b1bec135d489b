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
//     and awaited stopped on its host, the source;
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
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { m, err = tx.GetMigration(v.InstanceID); return err })
	switch {
	case errors.Is(err, store.ErrNotFound):
		if m, err = s.beginMigration(ctx, c, v, target); err != nil {
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
			err = s.migrationStop(ctx, c, m)
		case store.MigrationExporting:
			err = s.migrationExport(ctx, c, m)
		case store.MigrationImporting:
			err = s.migrationImport(ctx, c, m)
		case store.MigrationCleaning:
			if err = s.migrationClean(ctx, c, m); err == nil {
				return s.Get(ctx, c, v.InstanceID)
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
// placement chooses) and records the migration at its first step, with v
// asked to stop, in one transaction: a start asked meanwhile conflicts.
func (s *Service) beginMigration(ctx context.Context, c tenant.Caller, v *store.VTPM, target string) (*store.Migration, error) {
	if err := onShelf(v); err != nil {
		return nil, err
	}
	switch {
	case v.Desired == store.DesiredDeleted:
		return nil, errDeleting
	case v.Resize != nil:
		return nil, refusal.Conflict(api.CodeResizePending, fmt.Sprintf(
			"A resize of the vTPM (%s) awaits confirm or revert; confirm or revert it before migrating.", v.Resize.Kind))
	case len(v.EKs) == 0:
		return nil, refusal.Conflict(api.CodeNotManufactured, "The vTPM of "+v.InstanceID+" has no TPM yet: nothing to migrate; delete it and create it where it is wanted.")
	case target == v.Host:
		return nil, refusal.Invalid(api.CodeTargetIsSource, "The vTPM of "+v.InstanceID+" is on host "+target+" already.")
	}
	if err := s.hostUp(ctx, v.Host); err != nil {
		return nil, err
	}
	m := &store.Migration{InstanceID: v.InstanceID, Incarnation: v.Incarnation, Source: v.Host, Step: store.MigrationStopping,
		WasRunning: v.Desired == store.DesiredRunning, Actor: c.Actor}
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		all, err := s.hosts(tx, "")
		if err != nil {
			return err
		}
		if m.Target, err = migrationTarget(all, v, target); err != nil {
			return err
		}
		if err := tx.StartMigration(m); err != nil {
			return err
		}
		v.Desired = store.DesiredStopped
		if err := tx.UpdateVTPM(v); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "migration started",
			Detail: fmt.Sprintf("from host %s to host %s; stopped for the move", m.Source, m.Target)})
	})
	if errors.Is(err, store.ErrExists) || errors.Is(err, store.ErrConflict) {
		return nil, refusal.Conflict(api.CodeMigrationInProgress, "The vTPM of "+v.InstanceID+
			" changed while its migration began (another one began, say); migrate it again.")
	}
	if err != nil {
		return nil, err
	}
	s.cfg.Log.Info("migrating a vTPM", "instance", v.InstanceID, "from", m.Source, "to", m.Target, "by", c.Actor)
	return m, nil
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
// began), up to Config.DriftTimeout, then moves m on to exporting.
func (s *Service) migrationStop(ctx context.Context, c tenant.Caller, m *store.Migration) error {
	wait, cancel := context.WithTimeout(ctx, s.cfg.DriftTimeout)
	defer cancel()
	v, _, err := s.Watch(ctx, c, m.InstanceID, func(v *store.VTPM) bool {
		return v.Phase != store.PhaseStopped && v.Phase != store.PhaseError
	}, wait.Done())
	switch {
	case err != nil:
		return err
	case v.Phase == store.PhaseError:
		return refusal.Conflict(api.CodeConflict, "The vTPM of "+m.InstanceID+" failed to stop on host "+m.Source+": "+v.Reason)
	case v.Phase != store.PhaseStopped && ctx.Err() != nil:
		return ctx.Err()
	case v.Phase != store.PhaseStopped:
		return refusal.Unavailable(api.CodeHostUnavailable, fmt.Sprintf("The vTPM of %s did not stop on host %s within %s: is its agent running (vtpmctl hosts)?",
			m.InstanceID, m.Source, s.cfg.DriftTimeout))
	}
	return s.advance(ctx, c, m, store.MigrationExporting, "", "")
}

// migrationExport has the source's agent export m's vTPM as a bundle of a
// new generation, opens it as the vTPM's, and keeps it in m, moved on to
// importing.
func (s *Service) migrationExport(ctx context.Context, c tenant.Caller, m *store.Migration) error {
	v, err := s.Get(ctx, c, m.InstanceID)
	if err != nil {
		return err
	}
	if err := s.hostUp(ctx, m.Source); err != nil {
		return err
	}
	var ask *store.Transfer
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		gen, err := tx.HandOutGeneration(v.InstanceID, v.Incarnation)
		if err != nil {
			return err
		}
		ask = &store.Transfer{Host: m.Source, InstanceID: v.InstanceID, Incarnation: v.Incarnation, Kind: store.TransferExport, Generation: gen}
		return tx.AskTransfer(ask)
	})
	if err != nil {
		return err
	}
	defer s.withdraw(ctx, ask)
	got, err := s.awaitTransfer(ctx, ask)
	if err != nil {
		return err
	}
	if err := s.openAs(ctx, v, got.Bundle, ask.Generation); err != nil {
		return err
	}
	m.Generation, m.Bundle = ask.Generation, got.Bundle
	return s.advance(ctx, c, m, store.MigrationImporting, "migration exported", fmt.Sprintf("generation %d, %d bytes, from host %s", m.Generation, len(m.Bundle), m.Source))
}

// migrationImport has the target's agent take in m's bundle, proven to be
// the vTPM's TPM, then switches the record to the target, wanted running
// there if it was before the move, and moves m on to cleaning, in one
// transaction.
func (s *Service) migrationImport(ctx context.Context, c tenant.Caller, m *store.Migration) error {
	if err := s.hostUp(ctx, m.Target); err != nil {
		return err
	}
	ask := &store.Transfer{Host: m.Target, InstanceID: m.InstanceID, Incarnation: m.Incarnation, Kind: store.TransferReceive,
		Generation: m.Generation, Bundle: m.Bundle}
	if err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error { return tx.AskTransfer(ask) }); err != nil {
		return err
	}
	defer s.withdraw(ctx, ask)
	if _, err := s.awaitTransfer(ctx, ask); err != nil {
		return err
	}
	return s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
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
		m.Bundle = nil // the target's copy is the vTPM now
		from := m.Step
		m.Step = store.MigrationCleaning
		if err := tx.AdvanceMigration(m, from); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: m.InstanceID, Action: "migration imported",
			Detail: fmt.Sprintf("generation %d on host %s, its endorsement keys the record's; the vTPM is on host %s now", m.Generation, m.Target, m.Target)})
	})
}

// migrationClean has the source's agent remove its copy of m's vTPM, and
// ends m.
func (s *Service) migrationClean(ctx context.Context, c tenant.Caller, m *store.Migration) error {
	if err := s.hostUp(ctx, m.Source); err != nil {
		return fmt.Errorf("the vTPM of %s is on host %s; its old copy on host %s stays until migrate runs again with %s up: %w",
			m.InstanceID, m.Target, m.Source, m.Source, err)
	}
	ask := &store.Transfer{Host: m.Source, InstanceID: m.InstanceID, Incarnation: m.Incarnation, Kind: store.TransferDiscard, Generation: m.Generation}
	if err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error { return tx.AskTransfer(ask) }); err != nil {
		return err
	}
	defer s.withdraw(ctx, ask)
	if _, err := s.awaitTransfer(ctx, ask); err != nil {
		return err
	}
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		if err := tx.FinishMigration(m.InstanceID); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: m.InstanceID, Action: "migrated",
			Detail: fmt.Sprintf("from host %s to host %s; the copy on host %s is removed", m.Source, m.Target, m.Source)})
	})
	if err == nil {
		s.cfg.Log.Info("migrated a vTPM", "instance", m.InstanceID, "from", m.Source, "to", m.Target)
	}
	return err
}

// advance moves m on to step, with an event (action, detail) saying what
// the step it leaves did, if any.
func (s *Service) advance(ctx context.Context, c tenant.Caller, m *store.Migration, step store.MigrationStep, action, detail string) error {
	from := m.Step
	m.Step = step
	return s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		if err := tx.AdvanceMigration(m, from); err != nil {
			return err
		}
		if action == "" {
			return nil
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: m.InstanceID, Action: action, Detail: detail})
	})
}

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
