package verifier

import (
	"context"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/store"
)

// Requests for fresh evidence live in the store (store.Tx.AskRefresh), so
// that an agent's long poll on any server sharing it collects a request
// any server took: a commit wakes the polls of every server sharing the
// database at once (store.RefreshAsked).

// recheckRefresh is how often a long poll looks for a request though
// nothing woke it: the net for a wake-up lost while the store's listener
// reconnected.
const recheckRefresh = 10 * time.Second

// RequestRefresh asks the subject's agent, which must have registered, for
// fresh evidence now instead of at its next interval; it returns when it
// was asked.
func (v *Verifier) RequestRefresh(ctx context.Context, sub Subject) (time.Time, error) {
	at := v.now()
	err := v.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		if _, err := registeredIn(tx, sub); err != nil {
			return err
		}
		return tx.AskRefresh(sub.key, at)
	})
	return at, err
}

// AwaitRefresh is the subject's registered agent's wait for a request for
// fresh evidence: it returns one asked before at once, else waits for one
// until stop closes (Requested false). With a request it takes the names
// of the secrets revoked from the instance that its agent was not told of
// yet (a revocation asks for fresh evidence too: revokeReleases).
func (v *Verifier) AwaitRefresh(ctx context.Context, sub Subject, agentToken string, stop <-chan struct{}) (api.Refresh, error) {
	if err := v.Authorize(ctx, sub, agentToken); err != nil {
		return api.Refresh{}, err
	}
	for {
		// Listen, then look, so that a request between the two is not
		// missed.
		asked := v.cfg.Store.RefreshAsked(sub.key)
		var out api.Refresh
		err := v.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
			if out.RequestedAt, out.Requested, err = tx.TakeRefresh(sub.key); err != nil || !out.Requested || sub.vtpm == nil {
				return err
			}
			out.Revoked, err = tx.TakeRevocations(sub.key)
			return err
		})
		if err != nil || out.Requested {
			return out, err
		}
		t := time.NewTimer(recheckRefresh)
		select {
		case <-asked:
		case <-t.C:
		case <-stop:
			t.Stop()
			return api.Refresh{}, nil
		}
		t.Stop()
	}
}
