package client

import (
	"context"
	"time"
)

// pollInterval is how often Wait reads the vTPM; manufacturing takes tens
// of milliseconds; a 5 ms poll adds little to that and costs the server one
// indexed read.
const pollInterval = 5 * time.Millisecond

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
