package server

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/internal/store"
)

// maxWait bounds a long poll (a proxy in front of vtpmd must allow it as
// an idle time, or clients ask for less); the error message names it.
const maxWait = 5 * time.Minute

// recheck is how often a long poll on a record reads it again even if
// this process committed nothing: another server sharing a PostgreSQL
// database may have.
const recheck = time.Second

// longPoll is one request waiting for news: until its ?wait= deadline,
// until its client goes away, or until the server shuts down.
type longPoll struct {
	r     *http.Request
	timer *time.Timer
	end   <-chan struct{}
}

// longPoll reads the request's ?wait= (a Go duration or whole seconds, at
// most maxWait; def when absent).
func (s *Server) longPoll(r *http.Request, def time.Duration) (*longPoll, error) {
	d := def
	if q := r.URL.Query().Get("wait"); q != "" {
		var err error
		d, err = time.ParseDuration(q)
		if n, nerr := strconv.Atoi(q); nerr == nil {
			d, err = time.Duration(n)*time.Second, nil
		}
		if err != nil || d < 0 || d > maxWait {
			return nil, apiErr(http.StatusBadRequest, CodeInvalidParameter, "wait must be a duration (e.g. 60s) of at most 5m.")
		}
	}
	return &longPoll{r: r, timer: time.NewTimer(d), end: s.ending()}, nil
}

// wait waits for ch to close (a nil ch never does) or, with a non-zero
// every, that long; false means the poll is over instead.
func (p *longPoll) wait(ch <-chan struct{}, every time.Duration) bool {
	var tick <-chan time.Time
	if every > 0 {
		t := time.NewTimer(every)
		defer t.Stop()
		tick = t.C
	}
	select {
	case <-ch:
		return true
	case <-tick:
		return true
	case <-p.timer.C:
	case <-p.r.Context().Done():
	case <-p.end:
	}
	return false
}

func (p *longPoll) stop() { p.timer.Stop() }

// ending is closed by EndLongPolls.
func (s *Server) ending() <-chan struct{} {
	s.endOnce.Do(func() { s.end = make(chan struct{}) })
	return s.end
}

// EndLongPolls answers every long poll at once, and every later one
// without waiting, so that a graceful shutdown need not wait for them
// (http.Server.RegisterOnShutdown).
func (s *Server) EndLongPolls() {
	s.ending()
	s.endClose.Do(func() { close(s.end) })
}

// getVTPM reads a vTPM. With If-None-Match naming the version the client
// has (its ETag) and ?wait=, it answers when the record changes, or with
// 304 Not Modified when the wait ends first: a client waits for a phase
// without polling.
func (s *Server) getVTPM(w http.ResponseWriter, r *http.Request) error {
	p, err := s.longPoll(r, 0)
	if err != nil {
		return err
	}
	defer p.stop()
	var changed <-chan struct{}
	for {
		v, _, err := s.lookup(r)
		if err != nil {
			return err
		}
		tag := etag(v)
		w.Header().Set("ETag", tag)
		if !matches(r.Header.Get("If-None-Match"), tag) {
			writeJSON(w, http.StatusOK, s.view(v))
			return nil
		}
		if changed == nil {
			// Listen, then read again, so that a change between the two
			// reads is not missed. (Only for records that exist: a
			// listener is kept until its record next changes.)
			changed = s.Store.VTPMChanged(v.InstanceID)
			continue
		}
		if !p.wait(changed, recheck) {
			w.WriteHeader(http.StatusNotModified)
			return nil
		}
		changed = nil
	}
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
