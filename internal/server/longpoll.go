package server

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
)

// maxWait bounds a long poll (a proxy in front of vtpmd must allow it as
// an idle time, or clients ask for less); the error message names it.
const maxWait = 5 * time.Minute

// longPoll reads the request's ?wait= (a Go duration or whole seconds, at
// most maxWait; def when absent) and returns a channel that closes when
// the wait is over: at its deadline, when the client goes away, or when
// the server shuts down. end must be called when the request is done.
func (s *Server) longPoll(r *http.Request, def time.Duration) (over <-chan struct{}, end func(), err error) {
	d := def
	if q := r.URL.Query().Get("wait"); q != "" {
		d, err = time.ParseDuration(q)
		if n, nerr := strconv.Atoi(q); nerr == nil {
			d, err = time.Duration(n)*time.Second, nil
		}
		if err != nil || d < 0 || d > maxWait {
			return nil, nil, refusal.Invalid(api.CodeInvalidParameter, "wait must be a duration (e.g. 60s) of at most 5m.")
		}
	}
	ctx, cancel := context.WithTimeout(r.Context(), d)
	// No goroutine per waiting request: hundreds of agents' watches wait
	// at once.
	stop := context.AfterFunc(s.ending(), cancel)
	return ctx.Done(), func() { stop(); cancel() }, nil
}

// ending is done once EndLongPolls is called.
func (s *Server) ending() context.Context {
	s.endOnce.Do(func() { s.end, s.endAll = context.WithCancel(context.Background()) })
	return s.end
}

// EndLongPolls answers every long poll at once, and every later one
// without waiting, so that a graceful shutdown need not wait for them
// (http.Server.RegisterOnShutdown).
func (s *Server) EndLongPolls() {
	s.ending()
	s.endAll()
}

// getVTPM reads a vTPM. With If-None-Match naming the version the client
// has (its ETag) and ?wait=, it answers when the record changes, or with
// 304 Not Modified when the wait ends first: a client waits for a phase
// without polling.
func (s *Server) getVTPM(w http.ResponseWriter, r *http.Request) error {
	over, end, err := s.longPoll(r, 0)
	if err != nil {
		return err
	}
	defer end()
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	has := r.Header.Get("If-None-Match")
	v, changed, err := s.VTPMs.Watch(r.Context(), c, r.PathValue("id"), func(v *store.VTPM) bool { return matches(has, etag(v)) }, over)
	if err != nil {
		return err
	}
	w.Header().Set("ETag", etag(v))
	if !changed {
		w.WriteHeader(http.StatusNotModified)
		return nil
	}
	writeJSON(w, http.StatusOK, vtpmView(v))
	return nil
}

// etag names one version of a vTPM record: its generation, and its
// creation time, which tells a record re-created under the same instance
// id from the one before.
func etag(v *store.VTPM) string {
	return fmt.Sprintf(`"%d.%d"`, v.CreatedAt.UnixNano(), v.Generation)
}

// matches reports whether an If-None-Match header names tag.
func matches(header, tag string) bool {
	for t := range strings.SplitSeq(header, ",") {
		if t = strings.TrimSpace(t); t == tag || t == "*" || t == "W/"+tag {
			return true
		}
	}
	return false
}
