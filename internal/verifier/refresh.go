package verifier

import (
	"context"
	"sync"
	"time"
)

// refreshes are the requests for fresh evidence, per subject: one stays
// pending until the subject's agent collects it. They live in this
// process: an agent polls the server it attests to.
type refreshes struct {
	mu      sync.Mutex
	pending map[string]time.Time
	wake    map[string]chan struct{} // closed when a request comes
}

func (r *refreshes) ask(key string, at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pending == nil {
		r.pending = map[string]time.Time{}
	}
	r.pending[key] = at
	if ch := r.wake[key]; ch != nil {
		close(ch)
		delete(r.wake, key)
	}
}

// take collects key's pending request, or returns the channel that is
// closed when one comes.
func (r *refreshes) take(key string) (time.Time, bool, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if at, ok := r.pending[key]; ok {
		delete(r.pending, key)
		return at, true, nil
	}
	if r.wake == nil {
		r.wake = map[string]chan struct{}{}
	}
	if r.wake[key] == nil {
		r.wake[key] = make(chan struct{})
	}
	return time.Time{}, false, r.wake[key]
}

// RequestRefresh asks the subject's agent, which must have registered, for
// fresh evidence now instead of at its next interval; it returns when it
// was asked.
func (v *Verifier) RequestRefresh(ctx context.Context, sub Subject) (time.Time, error) {
	if _, err := v.registered(ctx, sub); err != nil {
		return time.Time{}, err
	}
	at := v.now()
	v.refreshes.ask(sub.key, at)
	return at, nil
}

// AwaitRefresh is the subject's registered agent's wait for a request for
// fresh evidence: it returns one asked before at once, else waits for one
// until stop closes (requested false).
func (v *Verifier) AwaitRefresh(ctx context.Context, sub Subject, agentToken string, stop <-chan struct{}) (at time.Time, requested bool, err error) {
	if err := v.Authorize(ctx, sub, agentToken); err != nil {
		return time.Time{}, false, err
	}
	at, ok, ch := v.refreshes.take(sub.key)
	if ok {
		return at, true, nil
	}
	select {
	case <-ch:
	case <-stop:
		return time.Time{}, false, nil
	}
	at, ok, _ = v.refreshes.take(sub.key)
	return at, ok, nil
}
