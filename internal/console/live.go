package console

import (
	"net/http"
	"time"
)

// Live pages: /ui/live is a stream of Server-Sent Events; the page's
// script (assets/console.js) fetches its own URL again at each "changed"
// event and swaps in the new live region. An event is sent when the store
// commits a change to any vTPM record or appends any event (a verdict
// change is one), on this server or, through PostgreSQL's notifications,
// another replica; at most one per settle, so that a burst of changes
// costs each open page one fetch.

// settle is how long after a change the stream waits for more before
// telling the page, and the least time between two events.
const settle = 150 * time.Millisecond

// keepAlive is how often a quiet stream sends a comment, so that proxies
// keep it open and a page whose server went away learns it; it is also a
// "changed" event, for what no commit announces (heartbeats ageing).
const keepAlive = 30 * time.Second

// live streams "changed" events until the page goes away, the server
// shuts down, or the viewer is nobody any more (signed out, the session
// ended or expired): each event first checks who views.
func (c *Console) live(q *request) error {
	flusher, ok := q.w.(http.Flusher)
	if !ok {
		return errNoPage
	}
	// Taken before the page is told the stream is open: no commit from
	// then on goes unannounced.
	changed := c.cfg.Store.FleetChanged()
	h := q.w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	q.w.WriteHeader(http.StatusOK)
	// The page tries again a second after the stream breaks.
	if _, err := q.w.Write([]byte("retry: 1000\n\n")); err != nil {
		return nil
	}
	flusher.Flush()
	tick := time.NewTicker(keepAlive)
	defer tick.Stop()
	for {
		select {
		case <-q.ctx().Done():
			return nil
		case <-c.closing:
			return nil
		case <-tick.C:
		case <-changed:
			select { // let a burst settle
			case <-time.After(settle):
			case <-q.ctx().Done():
				return nil
			}
		}
		// Taken before the page is told: what commits from here on is
		// the next event's.
		changed = c.cfg.Store.FleetChanged()
		if _, ok, err := c.viewer(q.r); err != nil || !ok {
			return nil
		}
		if _, err := q.w.Write([]byte("event: changed\ndata: {}\n\n")); err != nil {
			return nil
		}
		flusher.Flush()
	}
}
