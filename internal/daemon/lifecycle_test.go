package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/keyring"
)

// TestCreateDeleteRace deletes vTPMs while they are being provisioned, in
// a burst, with a pool of pre-manufactured TPMs (as vtpmd runs by
// default): half are deleted as soon as the create is answered, half once
// the agent has begun provisioning. Each delete must have shredded the
// vTPM's secret by the time it is answered; once every record is gone, no
// secret of the project and no state directory may be left, without a
// restart.
func TestCreateDeleteRace(t *testing.T) {
	const burst = 40
	dir := t.TempDir()
	u := startConfigured(t, Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "test-host", PoolSize: new(4)})
	waitPool(t, dir, 4)
	kr := openKeyring(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	ids := make([]string, burst)
	errs := make(chan error, burst)
	var wg sync.WaitGroup
	for i := range ids {
		ids[i] = fmt.Sprintf("0c0c0c0c-0000-4000-8000-%012d", i)
		wg.Go(func() {
			errs <- createThenDelete(ctx, u.c, kr, ids[i], i%2 == 1)
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	for _, id := range ids {
		u.waitGone(t, id)
	}

	left, err := kr.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, sid := range left {
		if s, err := kr.Get(ctx, sid); err == nil && s.Project == "p1" {
			t.Errorf("secret %s of project p1 is left after every vTPM was deleted", sid)
		}
	}
	for _, id := range ids {
		if _, err := os.Stat(filepath.Join(dir, "vtpms", id)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("state of deleted vTPM %s is left: %v", id, err)
		}
	}
}

// createThenDelete creates vTPM id and deletes it, once its provisioning
// began when started is set, and checks that the answered delete left
// its secret shredded.
func createThenDelete(ctx context.Context, c *client.Client, kr keyring.Keyring, id string, started bool) error {
	if _, err := c.Create(ctx, createRequest(id)); err != nil {
		return fmt.Errorf("create %s: %w", id, err)
	}
	if started {
		_, err := c.Wait(ctx, id, func(v api.VTPM) bool { return v.Phase != "pending" }, nil)
		if err != nil {
			return fmt.Errorf("waiting for %s to leave pending: %w", id, err)
		}
	}
	v, err := c.Delete(ctx, id)
	for client.IsConflict(err) { // "changed while the request ran"
		v, err = c.Delete(ctx, id)
	}
	if err != nil {
		return fmt.Errorf("delete %s: %w", id, err)
	}
	if _, err := kr.Get(ctx, v.SecretRef); !errors.Is(err, keyring.ErrNotFound) {
		return fmt.Errorf("delete of %s (phase %s) answered with its secret %s still there: %v", id, v.Phase, v.SecretRef, err)
	}
	return nil
}
