package swtpmhost

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// TestRemoveKeptIncoming: the swtpm Receive started for a vTPM arriving
// by live migration, left running by a vtpmd that stopped without
// stopping it (KeepRunning, as an agent killed leaves it), is killed by
// the next vtpmd's Remove, which no supervisor of it runs, with its
// state; Remove again does nothing.
func TestRemoveKeptIncoming(t *testing.T) {
	swtpmtest.Require(t)
	ctx := context.Background()
	cfg := Config{Root: t.TempDir(), KeepRunning: true}
	secret, err := keyring.NewVTPMSecret()
	if err != nil {
		t.Fatal(err)
	}
	v := agent.VTPM{InstanceID: instance, Spec: spec.Spec{Version: spec.V20}}
	first, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Receive(ctx, v, secret, nil); err != nil {
		t.Fatal(err)
	}
	if err := first.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if ps := swtpmtest.Processes(cfg.Root); len(ps) != 1 {
		t.Fatalf("swtpm processes left running: %q, want the incoming one", ps)
	}

	next, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close(ctx)
	for range 2 {
		if err := next.Remove(ctx, instance); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(5 * time.Second); len(swtpmtest.Processes(cfg.Root)) > 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("swtpm still running after Remove: %q", swtpmtest.Processes(cfg.Root))
		}
	}
	if _, err := os.Stat(next.Dir(instance)); !os.IsNotExist(err) {
		t.Fatalf("the state of %s after Remove: %v", instance, err)
	}
}
