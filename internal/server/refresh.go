package server

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/store"
)

// maxRefreshWait bounds an agent's long poll (a proxy in front of vtpmd
// must allow it as an idle time, or agents ask for less).
const maxRefreshWait = 5 * time.Minute

// refreshes are the requests for fresh evidence, per attestation key: one
// stays pending until an agent collects it. They live in this process: an
// agent polls the server it attests to.
type refreshes struct {
	mu      sync.Mutex
	pending map[string]time.Time
	wake    map[string]chan struct{} // closed when a request comes
	stopped bool
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
	if r.stopped {
		return time.Time{}, false, nil
	}
	if r.wake == nil {
		r.wake = map[string]chan struct{}{}
	}
	if r.wake[key] == nil {
		r.wake[key] = make(chan struct{})
	}
	return time.Time{}, false, r.wake[key]
}

// await returns the pending request for key, waiting up to d for one.
func (r *refreshes) await(ctx context.Context, key string, d time.Duration) (time.Time, bool) {
	at, ok, ch := r.take(key)
	if ok || ch == nil {
		return at, ok
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
		at, ok, _ = r.take(key)
		return at, ok
	case <-t.C:
	case <-ctx.Done():
	}
	return time.Time{}, false
}

// stop answers every long poll now and every later one at once.
func (r *refreshes) stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopped = true
	for key, ch := range r.wake {
		close(ch)
		delete(r.wake, key)
	}
}

// EndLongPolls answers agents' long polls at once, so that a graceful
// shutdown need not wait for them (http.Server.RegisterOnShutdown).
func (s *Server) EndLongPolls() { s.refreshes.stop() }

// requestRefresh asks the subject's agent for fresh evidence now, instead
// of at its next interval.
func (s *Server) requestRefresh(w http.ResponseWriter, r *http.Request) error {
	sub, _, err := s.registered(r)
	if err != nil {
		return err
	}
	out := api.Refresh{Requested: true, RequestedAt: time.Now().UTC()}
	s.refreshes.ask(sub.key, out.RequestedAt)
	writeJSON(w, http.StatusAccepted, out)
	return nil
}

// awaitRefresh is an agent's long poll: it answers when fresh evidence is
// asked for, or after ?wait= (default 60s, at most 5m) with requested false.
func (s *Server) awaitRefresh(w http.ResponseWriter, r *http.Request) error {
	wait := time.Minute
	if q := r.URL.Query().Get("wait"); q != "" {
		d, err := time.ParseDuration(q)
		if n, nerr := strconv.Atoi(q); nerr == nil {
			d, err = time.Duration(n)*time.Second, nil
		}
		if err != nil || d < 0 || d > maxRefreshWait {
			return apiErr(http.StatusBadRequest, CodeInvalidParameter, "wait must be a duration (e.g. 60s) of at most 5m.")
		}
		wait = d
	}
	sub, a, err := s.registered(r)
	if err != nil {
		return err
	}
	if err := fromAgent(r, a); err != nil {
		return err
	}
	at, ok := s.refreshes.await(r.Context(), sub.key, wait)
	writeJSON(w, http.StatusOK, api.Refresh{Requested: ok, RequestedAt: at})
	return nil
}

// registered is the request's subject, which must have registered an AK,
// and its attestation record.
func (s *Server) registered(r *http.Request) (sub subject, a *store.Attestation, err error) {
	if sub, err = s.subject(r); err != nil {
		return sub, nil, err
	}
	err = s.Store.View(r.Context(), func(tx *store.Tx) (err error) {
		a, err = tx.GetAttestation(sub.key)
		if errors.Is(err, store.ErrNotFound) || err == nil && a.RegisteredAt.IsZero() {
			return apiErr(http.StatusConflict, CodeNotRegistered, "The "+sub.kind()+" has no registered attestation key.")
		}
		return err
	})
	return sub, a, err
}
