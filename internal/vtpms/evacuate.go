package vtpms

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// evacuateWorkers is how many vTPMs an evacuation moves at a time.
const evacuateWorkers = 8

// Evacuate moves every vTPM of host, which is gone, to other hosts: down
// (its agent's heartbeat older than the window), or, with force, because
// the operator says so (host_not_down otherwise). For each of its vTPMs:
//
//   - with a backup: the newest becomes its shelved bundle (the record
//     leaves the host, phase shelved), and it is unshelved (Unshelve) on
//     another host the placement rules choose: the same TPM, its EK kept,
//     as of the backup; its events say what is lost (what changed in the
//     TPM after the backup was taken). A running one starts there.
//   - without one: refused (backup_not_found), nothing of it changed,
//     unless newTPM: then it gets a new TPM on another host (a new
//     incarnation: a new EK, no sealed data; its attestation goes, the
//     guest registers again), and its events say so.
//   - never manufactured: placed on another host, to be made there.
//   - being deleted: its record goes (its secret was shredded already).
//   - being shelved: its shelved bundle kept already, it is shelved.
//   - being unshelved there: it is unshelved elsewhere.
//   - a resize of it awaiting confirm or revert: refused
//     (resize_pending), nothing of it changed.
//
// A vTPM migrating from or to host (Migrate) is evacuated from the step
// its migration recorded, so that the newest copy of its state the
// control plane can reach is the one kept:
//
//   - from host, stopping or exporting: its state never left host; the
//     migration is abandoned (the vTPM wanted running again if it was)
//     and the vTPM is evacuated as above, from its newest backup.
//   - from host, importing: its bundle, exported when it stopped, is in
//     the migration; the target takes it in (migrated; nothing lost).
//   - from host, cleaning: it is on the target already; the migration
//     ends, the old copy gone with host (migrated).
//   - to host, before the record switched (stopping, exporting,
//     importing): its source still holds it; the migration is undone,
//     the vTPM wanted running there again if it was (returned).
//   - to host, cleaning (the record names host, the source has not
//     removed its copy yet): with a backup newer than the migration's
//     bundle, the source's copy goes and the vTPM is restored from that
//     backup as above; otherwise it goes back to its source, with the
//     state it had there when it left (returned; what changed on host
//     after the move is lost, and its events say so).
//
// Doing it again continues: the vTPMs still on host, those taken off it
// whose unshelve did not finish, and the migrations from or to it.
// progress, if not nil, is called first with the number of vTPMs to
// evacuate, then with each vTPM's outcome as it is known, one call at a
// time. The operator's: a project cannot.
func (s *Service) Evacuate(ctx context.Context, c tenant.Caller, host string, force, newTPM bool, progress func(api.EvacuationProgress)) (*api.Evacuation, error) {
	if c.Project != "" {
		return nil, refusal.Forbidden(api.CodeForbidden, "Hosts are the operator's: a project cannot evacuate one.")
	}
	hosts, err := s.Hosts(ctx, host)
	if err != nil {
		return nil, err
	}
	if len(hosts) == 0 {
		return nil, refusal.NotFound(api.CodeNotFound, "No such host.")
	}
	if hosts[0].State != spec.HostDown && !force {
		return nil, refusal.Conflict(api.CodeHostNotDown, fmt.Sprintf("Host %s is %s: its agent's last heartbeat was at %s. "+
			"Evacuate a host that is gone; if it is, and its agent still runs, say so with --force (and make sure it is stopped: "+
			"its copies of the vTPMs are not used again).", host, hosts[0].State, hosts[0].HeartbeatAt.Format(time.RFC3339)))
	}
	var vs []*store.VTPM
	var left []string
	var moving []store.Migration
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		if vs, err = tx.ListVTPMs(store.Filter{Host: host}); err != nil {
			return err
		}
		if left, err = tx.EvacuatedFrom(host); err != nil {
			return err
		}
		if moving, err = tx.ListMigrations(host); err != nil {
			return err
		}
		detail := fmt.Sprintf("%d vTPMs on it, %d taken off it earlier, %d migrating from or to it", len(vs), len(left), len(moving))
		if force {
			detail += "; forced by the operator"
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: store.HostKey(host), Action: "evacuating", Detail: detail})
	})
	if err != nil {
		return nil, err
	}
	migrating := map[string]bool{}
	for _, m := range moving {
		migrating[m.InstanceID] = true
	}
	vs = slices.DeleteFunc(vs, func(v *store.VTPM) bool { return migrating[v.InstanceID] })
	s.cfg.Log.Info("evacuating host", "host", host, "vtpms", len(vs), "left", len(left), "migrating", len(moving), "force", force, "by", c.Actor)

	moves := make([]func() api.EvacuatedVTPM, 0, len(moving)+len(vs)+len(left))
	for _, m := range moving {
		moves = append(moves, func() api.EvacuatedVTPM { return s.evacuateMigration(ctx, c, host, m, newTPM) })
	}
	for _, v := range vs {
		moves = append(moves, func() api.EvacuatedVTPM { return s.evacuate(ctx, c, host, v, newTPM) })
	}
	for _, id := range left {
		moves = append(moves, func() api.EvacuatedVTPM {
			v, err := s.Get(ctx, c, id)
			if err != nil {
				return s.refused(api.EvacuatedVTPM{InstanceID: id}, err)
			}
			return s.restore(ctx, c, v)
		})
	}
	out, err := evacuation(ctx, host, evacuateWorkers, moves, progress)
	if err != nil {
		return nil, err
	}
	detail := fmt.Sprintf("%d restored, %d with a new TPM, %d placed, %d deleted, %d shelved, %d migrated, %d returned, %d refused",
		out.Count[api.EvacuatedRestored], out.Count[api.EvacuatedNewTPM], out.Count[api.EvacuatedPlaced], out.Count[api.EvacuatedDeleted],
		out.Count[api.EvacuatedShelved], out.Count[api.EvacuatedMigrated], out.Count[api.EvacuatedReturned], out.Count[api.EvacuatedRefused])
	s.event(ctx, c, &store.VTPM{InstanceID: store.HostKey(host)}, "evacuated", detail)
	s.cfg.Log.Info("evacuated host", "host", host, "outcome", detail, "by", c.Actor)
	return out, nil
}

// evacuation makes moves, workers at a time, each taking one vTPM off
// host and saying what became of it, and answers with their outcomes in
// the order they finished. progress, if not nil, is called first with the
// number of moves, then with each outcome as it is known, one call at a
// time.
func evacuation(ctx context.Context, host string, workers int, moves []func() api.EvacuatedVTPM, progress func(api.EvacuationProgress)) (*api.Evacuation, error) {
	out := &api.Evacuation{Host: host, Items: []api.EvacuatedVTPM{}, Count: map[string]int{}}
	total := len(moves)
	if progress != nil {
		progress(api.EvacuationProgress{Total: total})
	}
	var mu sync.Mutex
	done := func(item api.EvacuatedVTPM) {
		mu.Lock()
		defer mu.Unlock()
		out.Items = append(out.Items, item)
		out.Count[item.Outcome]++
		if progress != nil {
			progress(api.EvacuationProgress{Done: len(out.Items), Total: total, Item: &item})
		}
	}
	work := make(chan func() api.EvacuatedVTPM)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for w := range work {
				done(w())
			}
		}()
	}
	for _, m := range moves {
		work <- m
	}
	close(work)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// evacuateMigration takes the vTPM migrating as m from or to host, which
// is gone, from the step m recorded, as Evacuate says.
func (s *Service) evacuateMigration(ctx context.Context, c tenant.Caller, host string, m store.Migration, newTPM bool) api.EvacuatedVTPM {
	item := api.EvacuatedVTPM{InstanceID: m.InstanceID, Generation: m.Generation}
	switch {
	case m.Source == host && m.Step == store.MigrationImporting:
		full, err := s.migration(ctx, m.InstanceID)
		if err != nil {
			return s.refused(item, err)
		}
		next, err := s.migrationImport(ctx, c, full, nil)
		if next != nil {
			s.withdraw(ctx, next) // the discard of the gone source's copy
		}
		if err != nil {
			s.event(ctx, c, &store.VTPM{InstanceID: m.InstanceID}, "migration failed", fmt.Sprintf(
				"step %s, from host %s (gone) to host %s: %s; evacuate host %s again to continue", m.Step, m.Source, m.Target, refusal.Truncate(err.Error()), host))
			return s.refused(item, err)
		}
		fallthrough
	case m.Source == host && m.Step == store.MigrationCleaning:
		err := s.endMigration(ctx, c, m, nil, "migrated", fmt.Sprintf("from host %s to host %s; its copy on host %s is gone with that host", m.Source, m.Target, m.Source))
		if err != nil {
			return s.refused(item, err)
		}
		item.Outcome, item.Host = api.EvacuatedMigrated, m.Target
		return item
	case m.Source == host:
		v, err := s.abandonOnto(ctx, c, m, m.Source, "migration abandoned", fmt.Sprintf(
			"its source host %s is gone before its state left it (step %s); the vTPM is evacuated from its newest backup", host, m.Step))
		if err != nil {
			return s.refused(item, err)
		}
		return s.evacuate(ctx, c, host, v, newTPM)
	case m.Step != store.MigrationCleaning:
		_, err := s.abandonOnto(ctx, c, m, m.Source, "migration undone", fmt.Sprintf(
			"its target host %s is gone (step %s); the vTPM stays on host %s, with its state there", host, m.Step, m.Source))
		if err != nil {
			return s.refused(item, err)
		}
		item.Outcome, item.Host = api.EvacuatedReturned, m.Source
		return item
	}
	// To host, switched to it already: the source's copy is the state as
	// it left, at m.Generation; a backup taken on host since is newer.
	var newest int64
	err := s.cfg.Store.View(ctx, func(tx *store.Tx) error {
		b, err := tx.GetBackup(m.InstanceID, m.Incarnation, 0)
		if err == nil {
			newest = b.Generation
		} else if !errors.Is(err, store.ErrNotFound) {
			return err
		}
		return nil
	})
	if err != nil {
		return s.refused(item, err)
	}
	if newest > m.Generation {
		full, err := s.migration(ctx, m.InstanceID)
		if err == nil {
			_, err = s.migrationClean(ctx, c, full, nil)
		}
		if err != nil {
			return s.refused(item, err)
		}
		v, err := s.Get(ctx, c, m.InstanceID)
		if err != nil {
			return s.refused(item, err)
		}
		return s.evacuate(ctx, c, host, v, newTPM)
	}
	_, err = s.abandonOnto(ctx, c, m, m.Target, "migration undone", fmt.Sprintf(
		"its target host %s is gone; the vTPM is back on host %s with the state it exported there (generation %d); what changed in the TPM on host %s after %s is lost",
		host, m.Source, m.Generation, host, m.UpdatedAt.Format(time.RFC3339)))
	if err != nil {
		return s.refused(item, err)
	}
	item.Outcome, item.Host = api.EvacuatedReturned, m.Source
	return item
}

// migration reads the migration of the vTPM id, with its bundle.
func (s *Service) migration(ctx context.Context, id string) (m *store.Migration, err error) {
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) error { m, err = tx.GetMigration(id); return err })
	return m, err
}

// abandonOnto ends m, whose vTPM's record names host at (its source, or
// its target for one switched already), and leaves the vTPM on m's source,
// stopped there and wanted running again if it was before the move, with
// an event (action, detail): the vTPM as written.
func (s *Service) abandonOnto(ctx context.Context, c tenant.Caller, m store.Migration, at, action, detail string) (*store.VTPM, error) {
	var out *store.VTPM
	err := s.endMigration(ctx, c, m, func(tx *store.Tx) error {
		v, err := tx.GetVTPM(m.InstanceID)
		if err != nil {
			return err
		}
		if v.Incarnation != m.Incarnation || v.Host != at {
			return refusal.Conflict(api.CodeConflict, "The vTPM of "+m.InstanceID+" changed under its migration; evacuate again.")
		}
		if at != m.Source {
			v.Host, v.Phase, v.Reason, v.Sockets, v.PID, v.Connected = m.Source, store.PhaseStopped, "", store.Sockets{}, 0, false
			how := fmt.Sprintf("put back to the copy on host %s, of generation %d, its host %s gone", m.Source, m.Generation, at)
			if err := rebaseAttestation(tx, c.Actor, m.InstanceID, how); err != nil {
				return err
			}
		}
		if m.WasRunning {
			v.Desired = store.DesiredRunning
		}
		out = v
		return tx.UpdateVTPM(v)
	}, action, detail)
	return out, err
}

// endMigration ends m (still at its step), with change (may be nil) and
// an event (action, detail) in the same transaction.
func (s *Service) endMigration(ctx context.Context, c tenant.Caller, m store.Migration, change func(*store.Tx) error, action, detail string) error {
	return s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		cur, err := tx.GetMigration(m.InstanceID)
		switch {
		case errors.Is(err, store.ErrNotFound):
			return refusal.Conflict(api.CodeConflict, "The migration of "+m.InstanceID+" ended meanwhile.")
		case err != nil:
			return err
		case cur.Step != m.Step && !(m.Step == store.MigrationImporting && cur.Step == store.MigrationCleaning):
			return refusal.Conflict(api.CodeConflict, "The migration of "+m.InstanceID+" moved on meanwhile; evacuate again.")
		}
		if change != nil {
			if err := change(tx); err != nil {
				return err
			}
		}
		if err := tx.FinishMigration(m.InstanceID); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: m.InstanceID, Action: action, Detail: detail})
	})
}

// evacuate takes v off host, which is gone, as Evacuate says.
func (s *Service) evacuate(ctx context.Context, c tenant.Caller, host string, v *store.VTPM, newTPM bool) api.EvacuatedVTPM {
	item := api.EvacuatedVTPM{InstanceID: v.InstanceID}
	if v.Desired == store.DesiredDeleted {
		err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
			return deleteRecord(tx, v.InstanceID, store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "deleted",
				Detail: "its host " + host + " is gone: the record goes, its state with the host"})
		})
		if err != nil {
			return s.refused(item, err)
		}
		item.Outcome = api.EvacuatedDeleted
		return item
	}
	if err := s.settled(ctx, v); err != nil {
		return s.refused(item, err)
	}
	if v.Phase == store.PhaseShelving {
		if _, err := s.shelved(ctx, v); err == nil {
			if _, err := s.leaveHost(ctx, c, v, "shelved", "its host "+host+" is gone; the control plane keeps its bundle"); err != nil {
				return s.refused(item, err)
			}
			item.Outcome = api.EvacuatedShelved
			return item
		}
	}
	if v.Phase == store.PhaseUnshelving {
		// Its shelved bundle is newer than any backup: unshelved elsewhere.
		next, err := s.leaveHost(ctx, c, v, "shelved", "its host "+host+" is gone while it was being unshelved there")
		if err != nil {
			return s.refused(item, err)
		}
		return s.restore(ctx, c, next)
	}
	if len(v.EKs) == 0 {
		return s.replace(ctx, c, host, v, false)
	}
	var b *store.Backup
	err := s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { b, err = tx.GetBackup(v.InstanceID, v.Incarnation, 0); return err })
	switch {
	case errors.Is(err, store.ErrNotFound) && newTPM:
		return s.replace(ctx, c, host, v, true)
	case errors.Is(err, store.ErrNotFound):
		return s.refused(item, refusal.NotFound(api.CodeBackupNotFound, "The vTPM of "+v.InstanceID+" has no backup: "+
			"nothing to restore it from. --new-tpm gives it a new TPM (a new EK; its sealed data is lost)."))
	case err != nil:
		return s.refused(item, err)
	}
	sh := &store.Shelved{InstanceID: v.InstanceID, Incarnation: v.Incarnation, Generation: b.Generation, Reason: store.ShelvedEvacuate,
		FromHost: host, CreatedAt: b.CreatedAt, Bundle: b.Bundle}
	var next store.VTPM
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		if err := tx.PutShelved(sh); err != nil {
			return err
		}
		next = *v // afresh at every attempt: UpdateVTPM bumps its generation
		offHost(&next)
		if err := tx.UpdateVTPM(&next); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "evacuating",
			Detail: fmt.Sprintf("host %s is gone: restoring the backup of generation %d (%s, taken %s); what changed in the TPM after it is lost",
				host, b.Generation, b.Reason, b.CreatedAt.Format(time.RFC3339))})
	})
	if err != nil {
		return s.refused(item, err)
	}
	return s.restore(ctx, c, &next)
}

// restore unshelves v, evacuated, on another host.
func (s *Service) restore(ctx context.Context, c tenant.Caller, v *store.VTPM) api.EvacuatedVTPM {
	item := api.EvacuatedVTPM{InstanceID: v.InstanceID}
	sh, err := s.shelved(ctx, v)
	if err != nil {
		return s.refused(item, err)
	}
	item.Generation, item.BackupAt = sh.Generation, &sh.CreatedAt
	if v, err = s.unshelve(ctx, c, v, ""); err != nil {
		return s.refused(item, err)
	}
	item.Outcome, item.Host = api.EvacuatedRestored, v.Host
	return item
}

// replace places v, off host, on another host to be made there: the same
// record if it was never manufactured; with fresh, a new vTPM of the
// instance (a new incarnation, keyed by the same secret) in place of one
// whose TPM was lost with its host.
func (s *Service) replace(ctx context.Context, c tenant.Caller, host string, v *store.VTPM, fresh bool) api.EvacuatedVTPM {
	item := api.EvacuatedVTPM{InstanceID: v.InstanceID, Outcome: api.EvacuatedPlaced}
	if fresh {
		item.Outcome = api.EvacuatedNewTPM
	}
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		hosts, err := s.candidates(tx)
		if err != nil {
			return err
		}
		others := hosts[:0]
		for _, h := range hosts {
			if h.Name != host {
				others = append(others, h)
			}
		}
		h, err := spec.Place(others, v.Spec.RequiredTraits())
		if err != nil {
			return err
		}
		item.Host = h.Name
		if !fresh {
			next := *v
			next.Host, next.Phase, next.Reason = h.Name, store.PhasePending, ""
			if err := tx.UpdateVTPM(&next); err != nil {
				return err
			}
			return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "evacuated",
				Detail: fmt.Sprintf("host %s is gone; never manufactured: placed on host %s", host, h.Name)})
		}
		err = deleteRecord(tx, v.InstanceID, store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "lost",
			Detail: fmt.Sprintf("host %s is gone and the vTPM had no backup: its TPM (EK, sealed data, counters) is lost; "+
				"a new TPM takes its place on host %s", host, h.Name)})
		if err != nil {
			return err
		}
		nv := &store.VTPM{InstanceID: v.InstanceID, Project: v.Project, Spec: v.Spec, Host: h.Name, Desired: v.Desired,
			Phase: store.PhasePending, SecretID: v.SecretID, Domain: v.Domain}
		if err := tx.CreateVTPM(nv); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: "evacuated with a new TPM",
			Detail: fmt.Sprintf("host %s is gone and the vTPM had no backup: a new TPM on host %s (a new EK; no sealed data; "+
				"the guest registers for attestation again)", host, h.Name)})
	})
	if err != nil {
		return s.refused(api.EvacuatedVTPM{InstanceID: v.InstanceID}, err)
	}
	return item
}

// refused is item refused with err: its code if it has one; another error
// is logged, and told as internal.
func (s *Service) refused(item api.EvacuatedVTPM, err error) api.EvacuatedVTPM {
	item.Outcome, item.Host = api.EvacuatedRefused, ""
	var r *refusal.Error
	var se *spec.Error
	switch {
	case errors.As(err, &r):
		item.Code, item.Message = r.Code, r.Message
	case errors.As(err, &se):
		item.Code, item.Message = se.Code, se.Message
	default:
		s.cfg.Log.Error("evacuating a vTPM", "instance", item.InstanceID, "err", err)
		item.Code, item.Message = api.CodeInternal, "Internal error; the server's log says more."
	}
	return item
}
