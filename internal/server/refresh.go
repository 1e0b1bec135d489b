package server

import (
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/store"
)

// refreshes are the requests for fresh evidence, per attestation key: one
// stays pending until an agent collects it. They live in this process: an
// agent polls the server it attests to.
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

// await returns the pending request for key, waiting until deadline (or
// until p ends) for one.
func (r *refreshes) await(p *longPoll, key string) (time.Time, bool) {
	at, ok, ch := r.take(key)
	if ok || !p.wait(ch, 0) {
		return at, ok
	}
	at, ok, _ = r.take(key)
	return at, ok
}

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
// asked for, or after ?wait= (default 60s) with requested false.
func (s *Server) awaitRefresh(w http.ResponseWriter, r *http.Request) error {
	p, err := s.longPoll(r, time.Minute)
	if err != nil {
		return err
	}
	defer p.stop()
	sub, a, err := s.registered(r)
	if err != nil {
		return err
	}
	if err := fromAgent(r, a); err != nil {
		return err
	}
	at, ok := s.refreshes.await(p, sub.key)
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
