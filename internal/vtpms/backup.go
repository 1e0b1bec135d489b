package vtpms

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/bundle"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// DefaultBackupKeep is how many backups of each vTPM are kept by default.
const DefaultBackupKeep = 3

// Backup has the agent of vTPM id's host export its state as a sealed
// bundle (package bundle) of a new generation and keeps it as a backup,
// with the newest Config.BackupKeep: the vTPM must be manufactured and
// active or stopped, on a host that is up. The server opens the bundle
// with the vTPM's secret before it keeps it: a bundle that is not the
// vTPM's, of the generation asked, is refused. Events: "backed up", or
// "backup failed" with the reason.
func (s *Service) Backup(ctx context.Context, c tenant.Caller, id, reason string) (*store.Backup, error) {
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return nil, err
	}
	if len(v.EKs) == 0 {
		return nil, refusal.Conflict(api.CodeNotManufactured, "The vTPM of "+v.InstanceID+" has no TPM yet: nothing to back up.")
	}
	if v.Phase != store.PhaseActive && v.Phase != store.PhaseStopped {
		return nil, refusal.Conflict(api.CodeConflict, "The vTPM of "+v.InstanceID+" is "+string(v.Phase)+"; it is backed up while active or stopped.")
	}
	if err := s.hostUp(ctx, v.Host); err != nil {
		return nil, err
	}
	gen, data, err := s.export(ctx, v)
	if err != nil {
		s.event(ctx, c, v, "backup failed", fmt.Sprintf("generation %d (%s): %s", gen, reason, refusal.Truncate(err.Error())))
		return nil, err
	}
	// Kept as taken when the server received it, by the server's clock,
	// which tells whether a stopped vTPM was backed up since it stopped.
	h, _ := bundle.ReadHeader(data)
	b := &store.Backup{InstanceID: v.InstanceID, Incarnation: v.Incarnation, Generation: gen, Reason: reason,
		SourceHost: h.SourceHost, CreatedAt: s.cfg.Now(), Size: len(data), Bundle: data}
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		if err := tx.RecordGeneration(v.InstanceID, v.Incarnation, b.Generation); err != nil {
			return err
		}
		if err := tx.PutBackup(b, s.cfg.BackupKeep); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "backed up",
			Detail: fmt.Sprintf("generation %d (%s), %d bytes, from host %s", b.Generation, reason, b.Size, b.SourceHost)})
	})
	if err != nil {
		return nil, err
	}
	b.Bundle = nil
	return b, nil
}

// Backups lists vTPM id's backups, newest first.
func (s *Service) Backups(ctx context.Context, c tenant.Caller, id string) ([]store.Backup, error) {
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return nil, err
	}
	var out []store.Backup
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { out, err = tx.ListBackups(v.InstanceID, v.Incarnation); return err })
	return out, err
}

// Restore replaces the state of vTPM id, which must be stopped (desired
// and observed), with its backup of generation gen (0: the newest), on
// its host: the server opens the bundle with the vTPM's secret first
// (bundle_corrupt, bundle_mismatch), refuses a generation older than the
// newest it recorded (stale_bundle) unless allowRollback, which is
// recorded as an event naming the caller; then the host's agent opens it
// again, proves that the state is the vTPM's TPM (its endorsement keys
// are the record's) and only then puts it in place. The vTPM keeps its
// identity: the same TPM, at the backup's time. Events: "restoring",
// "restored", or "restore failed" with the reason.
func (s *Service) Restore(ctx context.Context, c tenant.Caller, id string, gen int64, allowRollback bool) (*store.Backup, error) {
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return nil, err
	}
	if v.Desired != store.DesiredStopped || v.Phase != store.PhaseStopped {
		return nil, refusal.Conflict(api.CodeVTPMNotStopped, "The vTPM of "+v.InstanceID+" is "+string(v.Phase)+
			" (desired "+string(v.Desired)+"); stop it (vtpmctl stop) before restoring its state.")
	}
	if err := s.hostUp(ctx, v.Host); err != nil {
		return nil, err
	}
	var b *store.Backup
	var newest int64
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) {
		if b, err = tx.GetBackup(v.InstanceID, v.Incarnation, gen); errors.Is(err, store.ErrNotFound) {
			msg := "The vTPM of " + v.InstanceID + " has no backup."
			if gen != 0 {
				msg = fmt.Sprintf("The vTPM of %s has no backup of generation %d.", v.InstanceID, gen)
			}
			return refusal.NotFound(api.CodeBackupNotFound, msg)
		} else if err != nil {
			return err
		}
		newest, err = tx.NewestGeneration(v.InstanceID, v.Incarnation)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := s.openAs(ctx, v, b.Bundle, b.Generation); err != nil {
		s.event(ctx, c, v, "restore failed", fmt.Sprintf("generation %d: %s", b.Generation, refusal.Truncate(err.Error())))
		return nil, err
	}
	rollback := b.Generation < newest
	if rollback && !allowRollback {
		return nil, refusal.Conflict(api.CodeStaleBundle, fmt.Sprintf("Generation %d is older than generation %d, the newest recorded of the vTPM of %s: "+
			"restoring it rolls the TPM back (its NV counters too). Allow it explicitly (--allow-rollback) if that is what you want.",
			b.Generation, newest, v.InstanceID))
	}
	ask := &store.Transfer{Host: v.Host, InstanceID: v.InstanceID, Incarnation: v.Incarnation, Kind: store.TransferImport,
		Generation: b.Generation, Bundle: b.Bundle}
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		if err := notMigrating(tx, v.InstanceID); err != nil {
			return err
		}
		if rollback {
			err := tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "rollback allowed",
				Detail: fmt.Sprintf("by %s: generation %d, older than the newest recorded, %d", c.Actor, b.Generation, newest)})
			if err != nil {
				return err
			}
		}
		if err := tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "restoring",
			Detail: fmt.Sprintf("generation %d (%s, taken %s on host %s) on host %s", b.Generation, b.Reason, b.CreatedAt.Format(time.RFC3339), b.SourceHost, v.Host)}); err != nil {
			return err
		}
		return tx.AskTransfer(ask)
	})
	if err != nil {
		return nil, err
	}
	defer s.withdraw(ctx, ask)
	if _, err := s.awaitTransfer(ctx, ask); err != nil {
		s.event(ctx, c, v, "restore failed", fmt.Sprintf("generation %d: %s", b.Generation, refusal.Truncate(err.Error())))
		return nil, err
	}
	err = s.cfg.Store.Update(context.WithoutCancel(ctx), func(tx *store.Tx) error {
		if err := rebaseAttestation(tx, c.Actor, v.InstanceID, fmt.Sprintf("restored from its backup of generation %d", b.Generation)); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "restored",
			Detail: fmt.Sprintf("generation %d; what changed in the TPM after %s is gone", b.Generation, b.CreatedAt.Format(time.RFC3339))})
	})
	if err != nil {
		return nil, err
	}
	s.cfg.Log.Info("restored vTPM state", "instance", v.InstanceID, "generation", b.Generation, "rollback", rollback, "by", c.Actor)
	b.Bundle = nil
	return b, nil
}

// rebaseAttestation lifts the floor the verifier keeps of the instance's
// TPM counters (its last accepted quote's reset count, restart count and
// clock, which a later quote must not go below: attest.Verify's rollback
// check), in tx, with an event: vtpmd itself put the vTPM's state back to
// an earlier one (how), on the operator's word, so its counters went back
// with it, and its next quote sets the floor again. A rollback vtpmd did
// not make is still caught. The registration (AK, agent token) and the
// policy stay. Nothing if the instance never registered.
func rebaseAttestation(tx *store.Tx, actor, instanceID, how string) error {
	a, err := tx.GetAttestation(instanceID)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	a.Clock, a.ResetCount, a.RestartCount, a.PCRs, a.EventLog = 0, 0, 0, nil, nil
	a.IMALog, a.IMAEntries = nil, 0
	if err := tx.PutAttestation(a); err != nil {
		return err
	}
	return tx.AppendEvent(store.Event{Actor: actor, InstanceID: instanceID, Action: "attestation counters rebased",
		Detail: "the vTPM's state was " + how + ": its TPM counters went back with it; its next quote's counters are the floor " +
			"(its registration and policy stay)"})
}

// export has the agent of v's host export v's state as a bundle of a new
// generation, and opens it with v's secret (read from the key manager
// while the agent exports) as v's bundle of that generation: the
// generation, and the bundle, or why not.
func (s *Service) export(ctx context.Context, v *store.VTPM) (int64, []byte, error) {
	var ask *store.Transfer
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		gen, err := tx.HandOutGeneration(v.InstanceID, v.Incarnation)
		if err != nil {
			return err
		}
		ask = &store.Transfer{Host: v.Host, InstanceID: v.InstanceID, Incarnation: v.Incarnation, Kind: store.TransferExport, Generation: gen}
		return tx.AskTransfer(ask)
	})
	if err != nil {
		return 0, nil, err
	}
	defer s.withdraw(ctx, ask)
	secret := meanwhile(func() ([]byte, error) { return s.secret(ctx, v) })
	got, err := s.awaitTransfer(ctx, ask)
	if err != nil {
		return ask.Generation, nil, err
	}
	sec, err := secret()
	if err == nil {
		err = openWith(v, sec, got.Bundle, ask.Generation)
	}
	if err != nil {
		return ask.Generation, nil, err
	}
	return ask.Generation, got.Bundle, nil
}

// ask has the agent of x.Host do x (an import or a removal) and waits for
// its answer.
func (s *Service) ask(ctx context.Context, x *store.Transfer) error {
	if err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error { return tx.AskTransfer(x) }); err != nil {
		return err
	}
	defer s.withdraw(ctx, x)
	_, err := s.awaitTransfer(ctx, x)
	return err
}

// openAs opens data with v's secret as v's bundle of generation gen:
// bundle_corrupt or bundle_mismatch if it is not.
func (s *Service) openAs(ctx context.Context, v *store.VTPM, data []byte, gen int64) error {
	sec, err := s.secret(ctx, v)
	if err != nil {
		return err
	}
	return openWith(v, sec, data, gen)
}

// secret reads the key-manager secret that keys v's state (and seals its
// bundles): secret_not_found if the key manager has none.
func (s *Service) secret(ctx context.Context, v *store.VTPM) ([]byte, error) {
	sec, err := s.cfg.Keyring.Get(ctx, v.SecretID)
	if errors.Is(err, keyring.ErrNotFound) {
		return nil, refusal.Conflict(api.CodeSecretNotFound, "The key manager has no secret "+v.SecretID+" for the vTPM of "+v.InstanceID+".")
	}
	if err != nil {
		return nil, err
	}
	return sec.Payload, nil
}

// openWith opens data with secret as v's bundle of generation gen:
// bundle_corrupt or bundle_mismatch if it is not.
func openWith(v *store.VTPM, secret, data []byte, gen int64) error {
	b, err := bundle.Open(data, secret, v.InstanceID, v.Incarnation)
	switch {
	case errors.Is(err, bundle.ErrMismatch):
		return refusal.Conflict(api.CodeBundleMismatch, err.Error())
	case errors.Is(err, bundle.ErrCorrupt):
		return refusal.Conflict(api.CodeBundleCorrupt, err.Error())
	case err != nil:
		return err
	case b.Generation != gen:
		return refusal.Conflict(api.CodeBundleMismatch, fmt.Sprintf("The bundle is generation %d, not %d.", b.Generation, gen))
	}
	return nil
}

// meanwhile runs fn in a goroutine of its own and returns a function that
// waits for its result: for a key-manager read that need not wait for an
// agent's answer.
func meanwhile[T any](fn func() (T, error)) func() (T, error) {
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := fn()
		done <- result{v, err}
	}()
	return func() (T, error) {
		r := <-done
		return r.v, r.err
	}
}

// hostUp refuses, with host_unavailable, a transfer on a host that is not
// up: its agent would not answer.
func (s *Service) hostUp(ctx context.Context, name string) error {
	return s.cfg.Store.View(ctx, func(tx *store.Tx) error { return s.hostUpIn(tx, name) })
}

// hostUpIn is hostUp in tx.
func (s *Service) hostUpIn(tx *store.Tx, name string) error {
	up, err := s.isUp(tx, name)
	if err == nil && !up {
		err = hostDown(name)
	}
	return err
}

// isUp says whether host name is registered and not down (draining or
// not), read in tx.
func (s *Service) isUp(tx *store.Tx, name string) (bool, error) {
	h, err := tx.GetHost(name)
	if errors.Is(err, store.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return s.state(h, s.cfg.Now()) != spec.HostDown, nil
}

// hostDown is the refusal of a transfer on host name, down.
func hostDown(name string) error {
	return refusal.Unavailable(api.CodeHostUnavailable, "Host "+name+" is down: its agent cannot move the vTPM's state.")
}

// askIfUp asks x of its host in tx if the host is up, and returns it; nil
// if the host is down (whoever awaits x asks it later, and is refused
// while the host stays down).
func (s *Service) askIfUp(tx *store.Tx, x *store.Transfer) (*store.Transfer, error) {
	if up, err := s.isUp(tx, x.Host); err != nil || !up {
		return nil, err
	}
	return x, tx.AskTransfer(x)
}

// awaitTransfer waits for the answer to ask, up to Config.DriftTimeout:
// the agent's refusal, or the answer.
func (s *Service) awaitTransfer(ctx context.Context, ask *store.Transfer) (*store.Transfer, error) {
	return s.awaitTransferWithin(ctx, ask, s.cfg.DriftTimeout)
}

// awaitTransferWithin waits for the answer to ask, up to within.
func (s *Service) awaitTransferWithin(ctx context.Context, ask *store.Transfer, within time.Duration) (*store.Transfer, error) {
	timeout := time.NewTimer(within)
	defer timeout.Stop()
	reread := time.NewTicker(driftReread)
	defer reread.Stop()
	for {
		answered := s.cfg.Store.HostChanged(ask.Host)
		var got *store.Transfer
		if err := s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { got, err = tx.GetTransfer(ask.Host, ask.ID); return err }); err != nil {
			return nil, err
		}
		if got.Answered && got.Code != "" {
			return nil, agentTransferRefusal(got)
		}
		if got.Answered {
			return got, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-timeout.C:
			return nil, refusal.Unavailable(api.CodeHostUnavailable, fmt.Sprintf(
				"The agent of host %s did not answer within %s: is it running (vtpmctl hosts)?", ask.Host, within))
		case <-answered:
		case <-reread.C:
		}
	}
}

// agentTransferRefusal is the refusal an agent answered x with.
func agentTransferRefusal(x *store.Transfer) error {
	kind := refusal.KindConflict
	switch api.Code(x.Code) {
	case api.CodeNotFound:
		kind = refusal.KindNotFound
	case api.CodeTransferFailed:
		kind = refusal.KindUnavailable
	}
	return &refusal.Error{Kind: kind, Code: api.Code(x.Code), Message: x.Message}
}

// withdrawUnless withdraws ask (as withdraw) if *err is set: a step that
// succeeds withdraws its request in the transaction that records the step
// after.
func (s *Service) withdrawUnless(ctx context.Context, ask *store.Transfer, err *error) {
	if *err != nil {
		s.withdraw(ctx, ask)
	}
}

// withdraw removes ask, answered or not: this server is done with it.
func (s *Service) withdraw(ctx context.Context, ask *store.Transfer) {
	s.cfg.Store.Update(context.WithoutCancel(ctx), func(tx *store.Tx) error { return tx.WithdrawTransfer(ask.ID) })
}

// event appends an event of v, logging a failure to.
func (s *Service) event(ctx context.Context, c tenant.Caller, v *store.VTPM, action, detail string) {
	err := s.cfg.Store.Update(context.WithoutCancel(ctx), func(tx *store.Tx) error {
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: action, Detail: detail})
	})
	if err != nil {
		s.cfg.Log.Warn("recording an event", "instance", v.InstanceID, "action", action, "err", err)
	}
}

// backupLease names the lease (store.Tx.TakeLease) of the periodic
// backups: of the servers sharing a store, the one holding it backs up.
const backupLease = "state-backups"

// backupActor is who the periodic backups' events name.
const backupActor = "server:backups"

// RunBackups backs up, until ctx ends, every vTPM whose newest backup is
// older than interval, and every stopped vTPM not backed up since it
// stopped (BackupDue), on whichever server sharing the store holds the
// backups' lease: each round (a tenth of interval, at most a minute)
// takes or renews it for three rounds.
func (s *Service) RunBackups(ctx context.Context, replica string, interval time.Duration) {
	every := min(interval/10, time.Minute)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var held bool
		err := s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
			held, err = tx.TakeLease(backupLease, replica, 3*every)
			return err
		})
		if err == nil && held {
			err = s.BackupDue(ctx, interval)
		}
		if err != nil && ctx.Err() == nil {
			s.cfg.Log.Error("backing up vTPMs", "err", err)
		}
	}
}

// BackupDue backs up, one after another, each manufactured vTPM on a host
// that is up: reason "stop" for one stopped (desired and observed) with no
// backup since its record last changed, "periodic" for one whose newest
// backup is older than interval. A vTPM that cannot be backed up is
// logged and left for the next round (its event says why); the others go
// on.
func (s *Service) BackupDue(ctx context.Context, interval time.Duration) error {
	var vs []*store.VTPM
	var last map[string]time.Time
	err := s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) {
		if vs, err = tx.ListVTPMs(store.Filter{}); err != nil {
			return err
		}
		last, err = tx.LastBackups()
		return err
	})
	if err != nil {
		return err
	}
	down := map[string]bool{}
	hosts, err := s.Hosts(ctx, "")
	if err != nil {
		return err
	}
	for _, h := range hosts {
		down[h.Name] = h.State == spec.HostDown
	}
	c := tenant.Caller{Actor: backupActor}
	for _, v := range vs {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if len(v.EKs) == 0 || down[v.Host] || v.Phase != store.PhaseActive && v.Phase != store.PhaseStopped {
			continue
		}
		at, has := last[v.InstanceID]
		reason := ""
		switch {
		case v.Phase == store.PhaseStopped && v.Desired == store.DesiredStopped && (!has || at.Before(v.UpdatedAt)):
			reason = store.BackupStop
		case !has || s.cfg.Now().Sub(at) >= interval:
			reason = store.BackupPeriodic
		default:
			continue
		}
		if _, err := s.Backup(ctx, c, v.InstanceID, reason); err != nil {
			s.cfg.Log.Warn("backing up a vTPM", "instance", v.InstanceID, "host", v.Host, "reason", reason, "err", err)
		}
	}
	return nil
}
