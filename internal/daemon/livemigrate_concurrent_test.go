package daemon

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/cli"
)

// TestClusterLiveMigrateConcurrent empties a libvirt host of two running
// guests with vtpmctl host evacuate-live --max-concurrent 2, their
// migrations under way at once: the source's agent carries out each send
// apart from its watch. The first guest's QEMU is stopped (SIGSTOP) before
// the evacuation, so its migration stalls; the second guest is
// live-migrated to the other host and its record switches meanwhile. Once
// the first guest's QEMU goes on (SIGCONT), its migration finishes too.
// Both guests run on the other host (booted once, the same PCRs and NV
// value read from their TPMs there), with their TPM state there alone.
func TestClusterLiveMigrateConcurrent(t *testing.T) {
	hosts := twoLibvirtHosts(t)
	c, agents := liveCluster(t, hosts, "emulator")
	ctx := context.Background()
	// Both guests on hosts[0]: hosts[1] takes no new vTPM meanwhile.
	if _, err := c.op.DrainHost(ctx, hosts[1].name); err != nil {
		t.Fatal(err)
	}
	stalled := startLiveGuest(t, c, hosts, "user", false)
	moving := startLiveGuest(t, c, hosts, "host", false)
	if _, err := c.op.UndrainHost(ctx, hosts[1].name); err != nil {
		t.Fatal(err)
	}
	source, target := hosts[0], hosts[1]
	if stalled.on != source || moving.on != source {
		t.Fatalf("the guests run on %s and %s; want both on %s", stalled.on.name, moving.on.name, source.name)
	}
	t.Cleanup(func() { c.op.UndrainHost(ctx, source.name) })

	pidFile := filepath.Join(source.dir, "run", "qemu", stalled.name+".pid")
	data, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	qemu, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatalf("%s: %v", pidFile, err)
	}
	lastStalled, lastMoving := stalled.lastTick(t), moving.lastTick(t)
	if err := syscall.Kill(qemu, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			if err := syscall.Kill(qemu, syscall.SIGCONT); err != nil {
				t.Errorf("resuming QEMU %d: %v", qemu, err)
			}
		}
	}
	t.Cleanup(resume)

	type result struct {
		code     int
		out, err string
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		var out, errOut bytes.Buffer
		code := cli.Main(ctx, []string{"--server", "unix://" + filepath.Join(c.dir, "api.sock"), "host", "evacuate-live", source.name,
			"--max-concurrent", "2"}, &out, &errOut)
		done <- result{code, out.String(), errOut.String()}
	}()
	c.eventually(moving.id+" is live-migrated while the other guest's migration stalls", func() error {
		select {
		case r := <-done:
			t.Fatalf("the evacuation ended while a guest's QEMU was stopped: %d\n%s%s", r.code, r.out, r.err)
		default:
		}
		v, err := c.op.Get(ctx, moving.id)
		if err != nil {
			return err
		}
		if v.Host != target.name {
			return fmt.Errorf("its record names %s", v.Host)
		}
		return nil
	})
	t.Logf("%s live-migrated to %s in %v, the other guest's QEMU stopped", moving.id, target.name, time.Since(start).Round(time.Millisecond))
	if v, err := c.op.Get(ctx, stalled.id); err != nil || v.Host != source.name {
		t.Fatalf("the guest whose QEMU is stopped: %+v, %v; want it on %s still", v, err, source.name)
	}
	evs, err := c.op.Events(ctx, stalled.id)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, e := range evs.Items {
		actions = append(actions, e.Action)
	}
	if joined := strings.Join(actions, ","); !strings.Contains(joined, "live migration started") || strings.Contains(joined, "live-migrated") {
		t.Fatalf("the stalled guest's events: %v; want its live migration started and not done", actions)
	}
	logLiveEvents(t, c, stalled.id)

	resume()
	var r result
	select {
	case r = <-done:
	case <-time.After(5 * time.Minute):
		t.Fatal("the evacuation did not end within 5 minutes of QEMU going on")
	}
	t.Logf("vtpmctl host evacuate-live %s --max-concurrent 2 (%v):\n%s", source.name, time.Since(start).Round(time.Millisecond), r.out)
	if r.code != 0 {
		t.Fatalf("vtpmctl host evacuate-live: %d\n%s%s", r.code, r.out, r.err)
	}
	first, second := strings.Index(r.out, moving.id+": live-migrated to "+target.name), strings.Index(r.out, stalled.id+": live-migrated to "+target.name)
	if first < 0 || second < 0 || second < first || !strings.Contains(r.out, "host "+source.name+": 2 live-migrated, 0 cold-migrated, 0 refused") {
		t.Fatalf("the evacuation's output: want %s live-migrated, then %s, and the counts", moving.id, stalled.id)
	}
	for _, g := range []struct {
		*liveGuest
		last int
	}{{stalled, lastStalled}, {moving, lastMoving}} {
		g.checkSame(t, target, source, g.last)
		c.wait(g.id, "active")
		if hasTPMState(t, source, agents[source.name], g.id) || !hasTPMState(t, target, agents[target.name], g.id) {
			t.Fatalf("TPM state of %s after the evacuation: on %s %v, on %s %v", g.id, source.name, hasTPMState(t, source, agents[source.name], g.id),
				target.name, hasTPMState(t, target, agents[target.name], g.id))
		}
	}
}
