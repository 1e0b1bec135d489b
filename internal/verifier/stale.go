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

// WatchStale runs MarkStale until ctx ends, often enough that a verdict
// turns stale within a tenth of StaleAfter of its deadline.
func (v *Verifier) WatchStale(ctx context.Context) {
	t := time.NewTicker(v.cfg.StaleAfter / 10)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := v.MarkStale(ctx); err != nil && ctx.Err() == nil {
				v.cfg.Log.Error("marking overdue attestations stale", "err", err)
			}
		}
	}
}
