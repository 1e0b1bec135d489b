package verifier

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/internal/store"
)

// A registered subject must send genuine evidence within StaleAfter of its
// last (or of registering), or its verdict turns stale: at once for a
// reader (recordStatus), and recorded, an event and a webhook like any
// verdict change, by MarkStale.

// staleAt is when a's verdict turns stale without new evidence; zero when
// it cannot (unregistered, or stale already).
func (v *Verifier) staleAt(a *store.Attestation) time.Time {
	if a.RegisteredAt.IsZero() || a.Verdict == store.VerdictStale {
		return time.Time{}
	}
	return lastSeen(a).Add(v.cfg.StaleAfter)
}

// lastSeen is when a's subject last sent genuine evidence, or registered.
func lastSeen(a *store.Attestation) time.Time {
	if a.EvidenceAt.After(a.RegisteredAt) {
		return a.EvidenceAt
	}
	return a.RegisteredAt
}

// goStale turns a's verdict stale if its evidence is overdue at now.
func goStale(a *store.Attestation, now time.Time) {
	if a.StaleAt.IsZero() || now.Before(a.StaleAt) {
		return
	}
	a.Reasons = []string{fmt.Sprintf("no evidence since %s (the last verdict was %s)", lastSeen(a).Format(time.RFC3339), a.Verdict)}
	a.Verdict, a.StaleAt = store.VerdictStale, time.Time{}
}

// MarkStale turns the verdict of every subject whose evidence is overdue
// into stale, which like any verdict change is an event and a webhook.
func (v *Verifier) MarkStale(ctx context.Context) error {
	var keys []string
	err := v.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { keys, err = tx.OverdueAttestations(v.now()); return err })
	if err != nil {
		return err
	}
	for _, key := range keys {
		sub := Subject{key: key}
		if host, ok := strings.CutPrefix(key, store.HostKey("")); ok {
			sub.host = host
		} else if err := v.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { sub.vtpm, err = tx.GetVTPM(key); return err }); err != nil {
			return err
		}
		err := v.update(ctx, sub, "", func(a *store.Attestation) error { goStale(a, v.now()); return nil }, nil)
		if err != nil {
			return err
		}
	}
	return nil
}

// staleSweep names the stale sweep's lease (store.Tx.TakeLease): of the
// servers sharing a store, the one holding it sweeps.
const staleSweep = "stale-sweep"

// WatchStale sweeps until ctx ends, often enough that a verdict turns
// stale within a tenth of StaleAfter of its deadline: every round takes or
// renews the sweep's lease for three rounds, and sweeps (MarkStale) if it
// holds it. So of several servers sharing the store one sweeps, and when
// it stops another takes over within four rounds.
func (v *Verifier) WatchStale(ctx context.Context) {
	every := v.cfg.StaleAfter / 10
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if _, err := v.sweepStale(ctx, 3*every); err != nil && ctx.Err() == nil {
				v.cfg.Log.Error("marking overdue attestations stale", "err", err)
			}
		}
	}
}

// sweepStale takes or renews the stale sweep's lease for ttl and, if it
// holds it, runs MarkStale; it reports whether it did. A sweep that
// outlasts its lease may meet another server's: the verdicts stay right
// (each is turned stale in a transaction that reads it first), only the
// work is done twice.
func (v *Verifier) sweepStale(ctx context.Context, ttl time.Duration) (swept bool, err error) {
	var held bool
	err = v.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		held, err = tx.TakeLease(staleSweep, v.cfg.Replica, ttl)
		return err
	})
	if err != nil || !held {
		return false, err
	}
	return true, v.MarkStale(ctx)
}
