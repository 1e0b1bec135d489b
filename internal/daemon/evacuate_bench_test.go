package daemon

import (
	"context"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
)

// BenchmarkEvacuate evacuates a host of N vTPMs (VTPMD_BENCH_EVACUATE_N,
// default 50), each backed up, in the multi-host cluster (a server on
// PostgreSQL, two agents, each its own vtpmd process, over mTLS): the
// host's agent and swtpm processes are killed, and once the host reads
// down, the wall time from the evacuate request until every vTPM is
// active on the other host is measured (restore-s), with the request's
// own share (request-s: until each import proved it opens).
func BenchmarkEvacuate(b *testing.B) {
	n := 50
	if s := os.Getenv("VTPMD_BENCH_EVACUATE_N"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	for range b.N {
		c := newCluster(b)
		ctx := context.Background()
		a := c.addAgent("hv-a", n)
		ids := make([]string, n)
		for i := range ids {
			ids[i] = clusterID(1000 + i)
			if _, err := c.create(ids[i]); err != nil {
				b.Fatal(err)
			}
		}
		for _, id := range ids {
			c.wait(id, "active")
			if _, err := c.op.CreateBackup(ctx, id); err != nil {
				b.Fatal(err)
			}
		}
		c.addAgent("hv-b", n)
		stop(a.cmd, syscall.SIGKILL)
		for _, p := range swtpmPIDs(a) {
			if pid, err := strconv.Atoi(p); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		c.waitHost("hv-a", "down")

		b.StartTimer()
		start := time.Now()
		e, err := c.op.Evacuate(ctx, "hv-a", api.EvacuateRequest{}, nil)
		if err != nil || e.Count[api.EvacuatedRestored] != n {
			b.Fatalf("evacuation: %v %+v %+v", err, e.Count, e.Items)
		}
		request := time.Since(start)
		waitAllActive(b, c.op, "hv-b", n)
		all := time.Since(start)
		b.StopTimer()
		b.ReportMetric(request.Seconds(), "request-s")
		b.ReportMetric(all.Seconds(), "restore-s")
		b.ReportMetric(float64(n), "vtpms")
	}
}

// waitAllActive waits until n vTPMs are active on host.
func waitAllActive(b *testing.B, c *client.Client, host string, n int) {
	b.Helper()
	for deadline := time.Now().Add(10 * time.Minute); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		l, err := c.List(context.Background(), client.ListOptions{Host: host, Phase: "active", Limit: 1000})
		if err != nil {
			b.Fatal(err)
		}
		if len(l.Items) == n {
			return
		}
	}
	b.Fatalf("not all %d vTPMs active on %s", n, host)
}
