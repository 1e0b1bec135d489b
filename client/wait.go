package client

import (
	"context"
	"net/http"
	"net/url"
	"time"

	"github.com/vtpmd/vtpmd/api"
)

// longPoll is how long one request of Wait waits on the server for the
// vTPM to change.
const longPoll = 30 * time.Second

// Wait waits until done says so of the vTPM, reporting each change of
// phase to progress (may be nil). It does not poll: each request names the
// version it has (If-None-Match) and the server answers when the record
// changes. A vTPM that disappears ends the wait with a 404.
func (c *Client) Wait(ctx context.Context, id string, done func(api.VTPM) bool, progress func(api.VTPM)) (api.VTPM, error) {
	var v api.VTPM
	path, tag, last := "/v1/vtpms/"+url.PathEscape(id), "", ""
	for {
		hdr, query := http.Header{}, ""
		if tag != "" {
			hdr.Set("If-None-Match", tag)
			query = "?wait=" + longPoll.String()
		}
		var next api.VTPM
		resp, err := c.send(ctx, http.MethodGet, path+query, hdr, nil, &next)
		if err != nil {
			return v, err
		}
		if resp.StatusCode == http.StatusNotModified {
			continue
		}
		v, tag = next, resp.Header.Get("ETag")
		if progress != nil && v.Phase != last {
			progress(v)
			last = v.Phase
		}
		if done(v) {
			return v, nil
		}
		if tag == "" {
			// Something between here and the server drops ETags: poll.
			if err := sleep(ctx, 100*time.Millisecond); err != nil {
				return v, err
			}
		}
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
