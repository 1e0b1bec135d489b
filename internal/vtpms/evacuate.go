package vtpms

import (
	"context"
	"errors"
	"fmt"
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
//   - migrating, or a resize of it awaiting confirm or revert: refused
//     (migration_in_progress, resize_pending), nothing of it changed.
//
// Doing it again continues: the vTPMs still on host, and those taken off
// it whose unshelve did not finish. progress, if not nil, is called with
// each vTPM's outcome as it is known, one call at a time. The operator's:
// a project cannot.
func (s *Service) Evacuate(ctx context.Context, c tenant.Caller, host string, force, newTPM bool, progress func(api.EvacuatedVTPM)) (*api.Evacuation, error) {
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
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		if vs, err = tx.ListVTPMs(store.Filter{Host: host}); err != nil {
			return err
		}
		if left, err = tx.EvacuatedFrom(host); err != nil {
			return err
		}
		detail := fmt.Sprintf("%d vTPMs on it, %d taken off it earlier", len(vs), len(left))
		if force {
			detail += "; forced by the operator"
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: store.HostKey(host), Action: "evacuating", Detail: detail})
	})
	if err != nil {
		return nil, err
	}
	s.cfg.Log.Info("evacuating host", "host", host, "vtpms", len(vs), "left", len(left), "force", force, "by", c.Actor)

	out := &api.Evacuation{Host: host, Items: []api.EvacuatedVTPM{}, Count: map[string]int{}}
	var mu sync.Mutex
	done := func(item api.EvacuatedVTPM) {
		mu.Lock()
		defer mu.Unlock()
		out.Items = append(out.Items, item)
		out.Count[item.Outcome]++
		if progress != nil {
			progress(item)
		}
	}
	work := make(chan func() api.EvacuatedVTPM)
	var wg sync.WaitGroup
	for range evacuateWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for w := range work {
				done(w())
			}
		}()
	}
	for _, v := range vs {
		work <- func() api.EvacuatedVTPM { return s.evacuate(ctx, c, host, v, newTPM) }
	}
	for _, id := range left {
		work <- func() api.EvacuatedVTPM {
			v, err := s.Get(ctx, c, id)
			if err != nil {
				return s.refused(api.EvacuatedVTPM{InstanceID: id}, err)
			}
			return s.restore(ctx, c, v)
		}
	}
	close(work)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	detail := fmt.Sprintf("%d restored, %d with a new TPM, %d placed, %d deleted, %d shelved, %d refused", out.Count[api.EvacuatedRestored],
		out.Count[api.EvacuatedNewTPM], out.Count[api.EvacuatedPlaced], out.Count[api.EvacuatedDeleted], out.Count[api.EvacuatedShelved], out.Count[api.EvacuatedRefused])
	s.event(ctx, c, &store.VTPM{InstanceID: store.HostKey(host)}, "evacuated", detail)
	s.cfg.Log.Info("evacuated host", "host", host, "outcome", detail, "by", c.Actor)
	return out, nil
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
