package daemon

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
)

// BenchmarkColdMigration moves one real vTPM (swtpm backend) back and
// forth between two hosts whose agents are their own vtpmd processes,
// reached by a server on PostgreSQL over mTLS, as in production.
// "stopped" is vtpmd's own share of a cold migration: the vTPM is
// stopped already (the guest's stop is not vtpmd's), and the time is the
// whole migrate request: two watch round trips to the source's agent
// (export, then discard), one to the target's (import, with swtpm
// started on the state to prove its EKs), the bundle sealed, opened and
// stored. It reports the steps' shares, from their events. "running" is
// the end to end of a running vTPM: stop, move, and started again on the
// target, active.
func BenchmarkColdMigration(b *testing.B) {
	c := newCluster(b)
	c.addAgent("hv-a", 4)
	c.addAgent("hv-b", 4)
	ctx := context.Background()
	hosts := map[string]string{"hv-a": "hv-b", "hv-b": "hv-a"}

	b.Run("stopped", func(b *testing.B) {
		id := uuid.NewString() // each run its own: -count runs this again on the same cluster
		if _, err := c.create(id); err != nil {
			b.Fatal(err)
		}
		c.wait(id, "active")
		if _, err := c.op.Stop(ctx, id); err != nil {
			b.Fatal(err)
		}
		v := c.wait(id, "stopped")
		var export, imports, clean time.Duration
		b.ResetTimer()
		for b.Loop() {
			moved, err := c.op.Migrate(ctx, id, api.MigrateRequest{Host: hosts[v.Host]})
			if err != nil {
				b.Fatal(err)
			}
			v = moved
		}
		b.StopTimer()
		evs, err := c.op.Events(ctx, id)
		if err != nil {
			b.Fatal(err)
		}
		var started, exported, imported time.Time
		for _, e := range evs.Items {
			switch e.Action {
			case "migration started":
				started = e.At
			case "migration exported":
				exported = e.At
				export += e.At.Sub(started)
			case "migration imported":
				imported = e.At
				imports += e.At.Sub(exported)
			case "migrated":
				clean += e.At.Sub(imported)
			}
		}
		n := float64(b.N)
		b.ReportMetric(float64(export.Microseconds())/1000/n, "export-ms")
		b.ReportMetric(float64(imports.Microseconds())/1000/n, "import-ms")
		b.ReportMetric(float64(clean.Microseconds())/1000/n, "discard-ms")
	})

	b.Run("running", func(b *testing.B) {
		id := uuid.NewString()
		if _, err := c.create(id); err != nil {
			b.Fatal(err)
		}
		v := c.wait(id, "active")
		b.ResetTimer()
		for b.Loop() {
			if _, err := c.op.Migrate(ctx, id, api.MigrateRequest{Host: hosts[v.Host]}); err != nil {
				b.Fatal(err)
			}
			if v, err := c.op.Wait(ctx, id, func(v api.VTPM) bool { return v.Phase == "active" }, nil); err != nil {
				b.Fatalf("%+v: %v", v, err)
			}
			v, _ = c.op.Get(ctx, id)
		}
	})
}
