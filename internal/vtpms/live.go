package vtpms

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// liveSendTimeout bounds the wait for the source's agent to answer that
// the guest runs on the target: the migration of a guest's memory, which
// libvirt drives, takes as long as its memory and its writes to it need.
const liveSendTimeout = 30 * time.Minute

// liveLease is how long a live migration's record, which the server
// driving it touches while it waits on an agent, keeps another request
// from taking it over: a record left untouched longer was cut short (its
// server stopped), and the same request again resumes it.
const liveLease = 15 * time.Second

// LiveMigrate moves the vTPM of instance id with its running guest to host
// target, or when target is "" to the host placement chooses among the
// others (the operator's, as for Migrate), the guest running throughout:
//
//  1. preparing: the target's agent makes ready to receive the guest (in
//     libvirt's emulator mode the libvirt secret, as the vTPM's secret
//     security wants it; in external mode vtpmd's swtpm, serving before
//     QEMU connects) and says how the source reaches it;
//  2. sending: the source's agent has libvirt migrate the guest,
//     peer-to-peer, the TPM state in the migration stream; once the
//     guest runs on the target the record switches to it, in the same
//     transaction as the step after;
//  3. cleaning: the source's agent removes its copy (its swtpm stops only
//     now, in external mode), and the target's drops the libvirt secret
//     its mode does not keep.
//
// When preparing or sending fails (a source whose agent stops mid-send
// fails once it reads down; a target that reads down mid-send has the
// source cancel libvirt's migration) the guest runs on the source with its TPM:
// the target's agent removes what it prepared and the migration ends
// ("live migration failed"); unless the target answers that the guest
// runs there after all, which then goes on to cleaning. A live migration cut short while cleaning
// (a crash, a host down) is finished by the same call again. Events:
// "live migration started", "live migration prepared", "live migration
// sent", "live-migrated", "live migration failed".
func (s *Service) LiveMigrate(ctx context.Context, c tenant.Caller, id, target string) (*store.VTPM, error) {
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
		if m, err = s.beginLive(ctx, c, v, target); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	case !m.Live || target != "" && target != m.Target:
		return nil, refusal.Conflict(api.CodeMigrationInProgress, migratingMessage(m))
	case m.Step != store.MigrationCleaning && time.Since(m.UpdatedAt) < liveLease:
		return nil, refusal.Conflict(api.CodeMigrationInProgress, migratingMessage(m))
	case m.Step != store.MigrationCleaning:
		if m, err = s.resumeLive(ctx, c, v, m); err != nil {
			return nil, err
		}
	}
	for {
		step := m.Step
		switch step {
		case store.MigrationPreparing:
			err = s.livePrepare(ctx, c, m)
		case store.MigrationSending:
			err = s.liveSend(ctx, c, m)
		case store.MigrationCleaning:
			if err = s.liveClean(ctx, c, m); err == nil {
				return s.Get(ctx, c, v.InstanceID)
			}
			s.event(ctx, c, v, "live migration failed", fmt.Sprintf("cleaning, the guest running on host %s: %s; live-migrate again to finish",
				m.Target, refusal.Truncate(err.Error())))
			return nil, err
		default:
			err = fmt.Errorf("live migration of %s at an unknown step %q", v.InstanceID, step)
		}
		if err != nil {
			if landed, err := s.abortLive(ctx, c, m, err); !landed {
				return nil, err
			}
		}
	}
}

// resumeLive settles m, a live migration that a server left before it
// knew the guest ran on the target (it stopped while preparing or
// sending): the target's agent, asked to undo what it prepared, says
// where the guest is. On the target: the record switches to it and m goes
// on to cleaning. Not there: m ends, the guest running on the source with
// its TPM, and a new live migration to the same target begins. A target
// whose agent does not answer decides nothing: m stays, to be resumed
// again.
func (s *Service) resumeLive(ctx context.Context, c tenant.Caller, v *store.VTPM, m *store.Migration) (*store.Migration, error) {
	landed, err := s.undoTarget(ctx, m)
	switch {
	case err != nil:
		return nil, err
	case landed:
		return m, s.landLive(ctx, c, m, fmt.Sprintf("the guest runs on host %s (found when the live migration cut short at step %s was resumed)", m.Target, m.Step))
	}
	detail := fmt.Sprintf("step %s, from host %s to host %s: cut short (its server stopped); the guest runs on host %s, and the live migration begins again",
		m.Step, m.Source, m.Target, m.Source)
	if err := s.endLive(ctx, c, m, detail); err != nil {
		return nil, err
	}
	return s.beginLive(ctx, c, v, m.Target)
}

// migratingMessage says that m is under way, and how it is finished.
func migratingMessage(m *store.Migration) string {
	if m.Live {
		return fmt.Sprintf("The vTPM of %s is live-migrating from host %s to host %s (step %s); wait for it to finish "+
			"(one cut short: vtpmctl live-migrate again, %s after it stopped).", m.InstanceID, m.Source, m.Target, m.Step, liveLease)
	}
	return fmt.Sprintf("The vTPM of %s is migrating, cold, from host %s to host %s (step %s); migrate it again (vtpmctl migrate) "+
		"to finish that move first.", m.InstanceID, m.Source, m.Target, m.Step)
}

// beginLive checks that v can live-migrate (its guest runs), chooses the
// target (target, or one placement chooses) and records the migration at
// its first step.
func (s *Service) beginLive(ctx context.Context, c tenant.Caller, v *store.VTPM, target string) (*store.Migration, error) {
	if err := onShelf(v); err != nil {
		return nil, err
	}
	switch {
	case v.Desired == store.DesiredDeleted:
		return nil, errDeleting
	case v.Resize != nil:
		return nil, refusal.Conflict(api.CodeResizePending, fmt.Sprintf(
			"A resize of the vTPM (%s) awaits confirm or revert; confirm or revert it before migrating.", v.Resize.Kind))
	}
	if err := s.livesOn(ctx, v.Host); err != nil {
		return nil, err
	}
	switch {
	case v.Desired != store.DesiredRunning || v.Phase != store.PhaseActive || v.Domain == "":
		return nil, refusal.Conflict(api.CodeGuestNotRunning, fmt.Sprintf("The vTPM of %s is %s, wanted %s, in guest %s: a live migration "+
			"moves a running guest with its vTPM; migrate a stopped one cold (vtpmctl migrate).", v.InstanceID, v.Phase, v.Desired, refusal.Quote(v.Domain)))
	case target == v.Host:
		return nil, refusal.Invalid(api.CodeTargetIsSource, "The vTPM of "+v.InstanceID+" is on host "+target+" already.")
	}
	if err := s.hostUp(ctx, v.Host); err != nil {
		return nil, err
	}
	m := &store.Migration{InstanceID: v.InstanceID, Incarnation: v.Incarnation, Source: v.Host, Live: true, Step: store.MigrationPreparing,
		WasRunning: true, Actor: c.Actor}
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
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "live migration started",
			Detail: fmt.Sprintf("from host %s to host %s, guest %s running", m.Source, m.Target, v.Domain)})
	})
	if errors.Is(err, store.ErrExists) {
		return nil, refusal.Conflict(api.CodeMigrationInProgress, "The vTPM of "+v.InstanceID+" began another migration meanwhile.")
	}
	if err != nil {
		return nil, err
	}
	s.cfg.Log.Info("live-migrating a vTPM", "instance", v.InstanceID, "from", m.Source, "to", m.Target, "by", c.Actor)
	return m, nil
}

// liveBackend is the backend whose agents migrate a running guest
// (agent.LiveMigrator).
const liveBackend = "libvirt"

// livesOn refuses, with not_supported, to live-migrate from host when its
// backend cannot migrate a running guest.
func (s *Service) livesOn(ctx context.Context, host string) error {
	var h *store.Host
	err := s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { h, err = tx.GetHost(host); return err })
	switch {
	case errors.Is(err, store.ErrNotFound):
		return hostDown(host)
	case err != nil:
		return err
	case h.Backend != liveBackend:
		return refusal.Conflict(api.CodeNotSupported, "Host "+host+" runs the "+h.Backend+" backend, which cannot migrate a running guest: "+
			"only the "+liveBackend+" backend's can. Migrate the vTPM cold (vtpmctl migrate), which stops it for the move.")
	}
	return nil
}

// livePrepare has the target's agent make ready to receive m's guest and
// keeps how the source reaches it in m, moved on to sending.
func (s *Service) livePrepare(ctx context.Context, c tenant.Caller, m *store.Migration) error {
	if err := s.hostUp(ctx, m.Target); err != nil {
		return err
	}
	release := s.holdLive(ctx, m)
	got, err := s.transferStep(ctx, &store.Transfer{Host: m.Target, InstanceID: m.InstanceID, Incarnation: m.Incarnation, Kind: store.TransferPrepare},
		s.cfg.DriftTimeout)
	release()
	if err != nil {
		return err
	}
	m.Bundle = got.Bundle
	_, err = s.advance(ctx, c, m, store.MigrationSending, nil, "live migration prepared", "host "+m.Target+" is ready to receive the guest", noAsk)
	return err
}

// liveSend has the source's agent migrate m's guest to the target, then
// switches the record to the target, moving m on to cleaning, in one
// transaction.
func (s *Service) liveSend(ctx context.Context, c tenant.Caller, m *store.Migration) error {
	if err := s.hostUp(ctx, m.Source); err != nil {
		return err
	}
	start := time.Now()
	release := s.holdLive(ctx, m)
	err := s.awaitSend(ctx, m, &store.Transfer{Host: m.Source, InstanceID: m.InstanceID, Incarnation: m.Incarnation, Kind: store.TransferSend,
		Bundle: m.Bundle})
	release()
	if err != nil {
		return err
	}
	return s.landLive(ctx, c, m, fmt.Sprintf("the guest runs on host %s (migrated in %s)", m.Target, time.Since(start).Round(time.Millisecond)))
}

// liveCheck is how often the server waiting for a send reads whether
// the source and the target are up.
const liveCheck = 2 * time.Second

// awaitSend asks ask, a send of m, of the source's agent and waits for the
// answer for as long as a send may take (liveSendTimeout), withdrawing
// the request after; but only while the source is up: an agent that stops
// (killed while libvirt migrates, say) will not answer, and where the
// guest is is then the target's to say (abortLive), not the source's.
// Once the target reads down (its agent stopped: nothing would settle the
// vTPM there, or answer for it), the send is cancelled: the source's
// agent, asked to cancel, has libvirt abort the migration and answers how
// it ended, the guest on the source (host_unavailable, naming the target)
// or, if it landed first, on the target.
func (s *Service) awaitSend(ctx context.Context, m *store.Migration, ask *store.Transfer) error {
	if err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error { return tx.AskTransfer(ask) }); err != nil {
		return err
	}
	defer s.withdraw(ctx, ask)
	var cancel *store.Transfer
	defer func() {
		if cancel != nil {
			s.withdraw(ctx, cancel)
		}
	}()
	deadline := time.Now().Add(liveSendTimeout)
	for {
		_, err := s.awaitTransferWithin(ctx, ask, min(liveCheck, s.cfg.DriftTimeout, time.Until(deadline)))
		if !unanswered(err) || time.Now().After(deadline) {
			var r *refusal.Error
			if cancel != nil && errors.As(err, &r) && !unanswered(err) { // the source answered: not sent
				return refusal.Unavailable(api.CodeHostUnavailable, fmt.Sprintf("Host %s went down: the live migration to it was cancelled, "+
					"and the guest runs on host %s (%s).", m.Target, m.Source, refusal.Truncate(err.Error())))
			}
			return err
		}
		if err := s.hostUp(ctx, ask.Host); err != nil {
			return err
		}
		if cancel != nil {
			continue
		}
		if down := s.hostUp(ctx, m.Target); unanswered(down) {
			cancel = &store.Transfer{Host: m.Source, InstanceID: m.InstanceID, Incarnation: m.Incarnation, Kind: store.TransferCancel}
			if err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error { return tx.AskTransfer(cancel) }); err != nil {
				cancel = nil
				return err
			}
			s.cfg.Log.Warn("cancelling a live migration: its target is down", "instance", m.InstanceID, "from", m.Source, "to", m.Target)
		}
	}
}

// holdLive touches m's record every third of liveLease, so that no
// other request takes it over, until the returned func is called.
func (s *Service) holdLive(ctx context.Context, m *store.Migration) (release func()) {
	touched, step := *m, m.Step
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(liveLease / 3)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				err := s.cfg.Store.Update(context.WithoutCancel(ctx), func(tx *store.Tx) error { return tx.AdvanceMigration(&touched, step) })
				if err != nil {
					s.cfg.Log.Warn("keeping a live migration's record", "instance", m.InstanceID, "err", err)
				}
			}
		}
	}()
	return func() { close(done); <-stopped }
}

// landLive switches the record of m's vTPM to the target, where its guest
// runs (detail says so), moving m on to cleaning, in one transaction.
func (s *Service) landLive(ctx context.Context, c tenant.Caller, m *store.Migration, detail string) error {
	return s.cfg.Store.Update(context.WithoutCancel(ctx), func(tx *store.Tx) error {
		v, err := tx.GetVTPM(m.InstanceID)
		if err != nil {
			return err
		}
		if v.Incarnation != m.Incarnation || v.Host != m.Source {
			return fmt.Errorf("vtpm %s changed under its live migration: %w", m.InstanceID, store.ErrConflict)
		}
		// The target's agent reports its swtpm and sockets once it
		// reconciles the vTPM; until then they are not known.
		v.Host, v.Reason, v.Sockets, v.PID, v.Connected = m.Target, "", store.Sockets{}, 0, false
		if err := tx.UpdateVTPM(v); err != nil {
			return err
		}
		from := m.Step
		m.Step, m.Bundle = store.MigrationCleaning, nil
		if err := tx.AdvanceMigration(m, from); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: m.InstanceID, Action: "live migration sent",
			Detail: detail + "; the vTPM is on host " + m.Target + " now"})
	})
}

// liveClean has the source's agent remove its copy of m's vTPM and the
// target's drop what only the move needed, and ends m.
func (s *Service) liveClean(ctx context.Context, c tenant.Caller, m *store.Migration) error {
	for _, step := range []struct{ host, kind string }{{m.Source, store.TransferDiscard}, {m.Target, store.TransferSettle}} {
		if err := s.hostUp(ctx, step.host); err != nil {
			return err
		}
		if _, err := s.transferStep(ctx, &store.Transfer{Host: step.host, InstanceID: m.InstanceID, Incarnation: m.Incarnation, Kind: step.kind},
			s.cfg.DriftTimeout); err != nil {
			return err
		}
	}
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		if err := tx.FinishMigration(m.InstanceID); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: m.InstanceID, Action: "live-migrated",
			Detail: fmt.Sprintf("from host %s to host %s; the copy on host %s is removed", m.Source, m.Target, m.Source)})
	})
	if err == nil {
		s.cfg.Log.Info("live-migrated a vTPM", "instance", m.InstanceID, "from", m.Source, "to", m.Target)
	}
	return err
}

// abortLive ends m, which failed with why before the guest was known to
// run on the target: the target's agent removes what it prepared, and the
// guest runs on the source. Unless the target says the guest runs there
// after all (the source's agent failed after libvirt moved it): then the
// record switches to the target and m goes on to cleaning (landed). A
// request the target's agent does not answer (it is down, or was killed)
// stays asked: the agent carries it out when it is back.
func (s *Service) abortLive(ctx context.Context, c tenant.Caller, m *store.Migration, why error) (landed bool, err error) {
	ctx = context.WithoutCancel(ctx)
	landed, err = s.undoTarget(ctx, m)
	if landed {
		return true, s.landLive(ctx, c, m, fmt.Sprintf("the guest runs on host %s (though step %s answered: %s)", m.Target, m.Step, refusal.Truncate(why.Error())))
	}
	detail := fmt.Sprintf("step %s, from host %s to host %s: %s; the guest runs on host %s", m.Step, m.Source, m.Target,
		refusal.Truncate(why.Error()), m.Source)
	switch {
	case unanswered(err):
		detail += fmt.Sprintf("; host %s removes what it prepared when its agent is back", m.Target)
	case err != nil:
		detail += fmt.Sprintf("; host %s did not remove what it prepared: %s", m.Target, refusal.Truncate(err.Error()))
	}
	return false, errors.Join(why, s.endLive(ctx, c, m, detail))
}

// undoTarget asks the target of m to remove what it prepared, and says
// whether it answered that the guest runs there instead. While the guest
// is still arriving it asks again, for as long as a send may take. A
// request its agent does not answer in time stays asked (unanswered).
func (s *Service) undoTarget(ctx context.Context, m *store.Migration) (landed bool, err error) {
	deadline := time.Now().Add(liveSendTimeout)
	for {
		ask := &store.Transfer{Host: m.Target, InstanceID: m.InstanceID, Incarnation: m.Incarnation, Kind: store.TransferAbort}
		if err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error { return tx.AskTransfer(ask) }); err != nil {
			return false, err
		}
		// A target down answers nothing: the request waits for its agent.
		if err := s.hostUp(ctx, m.Target); err != nil {
			return false, err
		}
		_, err = s.awaitTransferWithin(ctx, ask, s.cfg.DriftTimeout)
		if unanswered(err) {
			return false, err
		}
		s.withdraw(ctx, ask)
		var r *refusal.Error
		switch {
		case errors.As(err, &r) && r.Code == api.CodeGuestRunsHere:
			return true, nil
		case err == nil || !errors.As(err, &r) || r.Code != api.CodeGuestArriving || time.Now().After(deadline):
			return false, err
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// endLive ends m, the guest running on the source, with a "live migration
// failed" event saying detail.
func (s *Service) endLive(ctx context.Context, c tenant.Caller, m *store.Migration, detail string) error {
	return s.cfg.Store.Update(context.WithoutCancel(ctx), func(tx *store.Tx) error {
		if err := tx.FinishMigration(m.InstanceID); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: m.InstanceID, Action: "live migration failed", Detail: detail})
	})
}

// unanswered says whether err is awaitTransferWithin's: the agent did not
// answer in time.
func unanswered(err error) bool {
	var r *refusal.Error
	return errors.As(err, &r) && r.Code == api.CodeHostUnavailable
}

// transferStep asks ask of its host's agent and waits up to timeout for
// the answer, withdrawing the request after.
func (s *Service) transferStep(ctx context.Context, ask *store.Transfer, timeout time.Duration) (*store.Transfer, error) {
	if err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error { return tx.AskTransfer(ask) }); err != nil {
		return nil, err
	}
	defer s.withdraw(ctx, ask)
	return s.awaitTransferWithin(ctx, ask, timeout)
}
