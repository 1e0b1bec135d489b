package vtpms

import (
	"context"
	"fmt"
	"time"

	"github.com/vtpmd/vtpmd/internal/store"
)

// sweepActor is who the events of swept transfers name.
const sweepActor = "server:housekeeping"

// abandonedAfter is how long after it was asked a request to a
// host's agent (store.Transfer) is abandoned: twice the longest a server
// waits for one (a live migration's send, liveSendTimeout, or
// Config.DriftTimeout, whichever is longer).
func (s *Service) abandonedAfter() time.Duration {
	return 2 * max(liveSendTimeout, s.cfg.DriftTimeout)
}

// SweepTransfers removes the requests to hosts' agents asked longer ago
// than abandonedAfter, answered or not, and returns how many. A
// request is awaited only by the server request that asked it, for a
// bounded time, and a move run again asks its step anew; so one that old
// is abandoned (its server gave up, or died before withdrawing it: a move
// cut short and never run again, a backup whose server was killed) and
// nothing will read it again. Unanswered, it would still wake its agent
// when the host comes back, for work no one awaits. Each swept request
// gets a "transfer swept" event of its vTPM. Idempotent, and safe on
// several servers at once: each request is reported by the one sweep that
// removed it.
func (s *Service) SweepTransfers(ctx context.Context) (int, error) {
	var swept []store.Transfer
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		if swept, err = tx.SweepTransfers(s.cfg.Now().Add(-s.abandonedAfter())); err != nil {
			return err
		}
		for _, x := range swept {
			state := "unanswered"
			if x.Answered {
				state = "answered, never collected"
			}
			err := tx.AppendEvent(store.Event{Actor: sweepActor, InstanceID: x.InstanceID, Action: "transfer swept", Detail: fmt.Sprintf(
				"a %s request to host %s asked at %s, %s: no server awaits it any more", x.Kind, x.Host, x.AskedAt.Format(time.RFC3339), state)})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	s.swept.Add(int64(len(swept)))
	for _, x := range swept {
		s.cfg.Log.Info("swept an abandoned transfer", "instance", x.InstanceID, "host", x.Host, "kind", x.Kind, "asked_at", x.AskedAt, "answered", x.Answered)
	}
	return len(swept), nil
}

// TransfersSwept is how many requests SweepTransfers removed in this
// process.
func (s *Service) TransfersSwept() int64 { return s.swept.Load() }
