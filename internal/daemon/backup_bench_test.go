package daemon

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
)

// BenchmarkBackup backs one real vTPM (swtpm backend, all-in-one on
// SQLite) up through the API again and again: the whole cost of a
// backup, the agent's export and seal, the server's open and store
// write, the watch and HTTP between them. It reports the CPU time of
// the process (user and system) and the sealed bundle's bytes per
// backup, and what 1,000 vTPMs backed up hourly cost of one core.
func BenchmarkBackup(b *testing.B) {
	u := startConfigured(b, Config{DataDir: b.TempDir(), Listen: "127.0.0.1:0", HostName: "bench-host", BackupKeep: 3})
	const id = "5b0f6a52-1c1e-4d57-9a42-0d1b5c7e2a09"
	ctx := context.Background()
	_, err := u.c.Create(ctx, api.CreateVTPMRequest{InstanceID: id, Project: "p1",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}})
	if err != nil {
		b.Fatal(err)
	}
	u.wait(b, id, "active")
	var size int
	cpu0 := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		bk, err := u.c.CreateBackup(ctx, id)
		if err != nil {
			b.Fatal(err)
		}
		size = bk.Size
	}
	b.StopTimer()
	perBackup := (cpuTime() - cpu0) / time.Duration(b.N)
	b.ReportMetric(float64(perBackup.Microseconds())/1000, "cpu-ms/backup")
	b.ReportMetric(float64(size), "bundle-bytes")
	b.ReportMetric(100*1000*perBackup.Seconds()/3600, "%core-1000-hourly")
}

// cpuTime is the CPU time this process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
