package client

import (
	"context"
	"time"
)

// pollInterval is how often Wait reads the vTPM; manufacturing takes tens
// of milliseconds, so a short interval keeps create latency honest.
const pollInterval = 20 * time.Millisecond

func sleep(ctx context.Context) error {
	t := time.NewTimer(pollInterval)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
