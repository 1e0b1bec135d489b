package vtpms

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// DefaultDriftTimeout is how long a drift check waits for the host's
// agent, unless Config.DriftTimeout says.
const DefaultDriftTimeout = 30 * time.Second

// driftReread bounds how long a drift check misses an answer committed by
// another server process, whose commits do not wake it.
const driftReread = time.Second

// Drift asks host's agent what differs between the host and its records,
// deleting orphans with repair, and waits for its answer: the request
// reaches the agent through its watch, the answer comes back over the
// agent protocol, and nothing reaches into the host from here. A host
// whose agent does not answer within Config.DriftTimeout is refused as
// unavailable.
func (s *Service) Drift(ctx context.Context, c tenant.Caller, host string, repair bool) (*api.Drift, error) {
	if c.Project != "" {
		return nil, refusal.Forbidden(api.CodeForbidden, "Hosts are the operator's: a project cannot check one.")
	}
	var asked int64
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		asked, err = tx.AskDrift(host, repair)
		if errors.Is(err, store.ErrNotFound) {
			return refusal.NotFound(api.CodeNotFound, "No such host.")
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	timeout := time.NewTimer(s.cfg.DriftTimeout)
	defer timeout.Stop()
	reread := time.NewTicker(driftReread)
	defer reread.Stop()
	for {
		answered := s.cfg.Store.HostChanged(host)
		var d *store.Drift
		if err := s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { d, err = tx.GetDrift(host); return err }); err != nil {
			return nil, err
		}
		if d.Answered >= asked {
			out := &api.Drift{Host: host}
			if err := json.Unmarshal(d.Findings, &out.Findings); err != nil {
				return nil, err
			}
			return out, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-timeout.C:
			return nil, refusal.Unavailable(api.CodeHostUnavailable,
				fmt.Sprintf("The host's agent did not answer within %s: is it running (vtpmctl hosts)?", s.cfg.DriftTimeout))
		case <-answered:
		case <-reread.C:
		}
	}
}
