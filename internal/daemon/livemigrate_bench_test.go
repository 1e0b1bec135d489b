package daemon

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
)

// BenchmarkLiveMigration live-migrates, in the same run and alternately,
// two running guests back and forth between the two libvirt hosts: the
// test guest without a TPM, by libvirt alone, and the same guest with a
// vTPM (emulator mode, secret security user) through vtpmd. For each it
// reports libvirt's migration time and the guest's downtime, as libvirt
// measured them (the completed job's statistics on the destination), and
// for the vTPM the ratios to the guest without, the whole request
// (live-migrate, from the call to the answer) and vtpmd's share of it:
// the request less libvirt's migration.
func BenchmarkLiveMigration(b *testing.B) {
	hosts := twoLibvirtHosts(b)
	c, _ := liveCluster(b, hosts, "emulator")
	ctx := context.Background()
	g := startLiveGuest(b, c, hosts, "user")

	id, dir := uuid.NewString(), b.TempDir()
	d := migrationGuest(b, hosts, id, dir, nil)
	xml, err := d.Marshal()
	if err != nil {
		b.Fatal(err)
	}
	dom, err := hosts[0].lv.DomainDefineXML(xml)
	if err != nil {
		b.Fatal(err)
	}
	if err := hosts[0].lv.DomainCreate(dom); err != nil {
		b.Fatal(err)
	}
	waitTick(b, filepath.Join(dir, "console.log"), 0)
	plainOn, plainOther := hosts[0], hosts[1]

	var plain, tpm jobTimes
	var requests time.Duration
	b.ResetTimer()
	for b.Loop() {
		migrateLive(b, plainOn, plainOther, d.Name)
		plain.add(b, plainOther, d.Name)
		plainOn, plainOther = plainOther, plainOn

		start := time.Now()
		if _, err := c.op.LiveMigrate(ctx, g.id, api.LiveMigrateRequest{Host: g.other.name}); err != nil {
			b.Fatal(err)
		}
		requests += time.Since(start)
		tpm.add(b, g.other, g.name)
		g.on, g.other = g.other, g.on
	}
	b.StopTimer()
	n := float64(plain.n)
	b.ReportMetric(float64(plain.elapsed.Milliseconds())/n, "plain-migration-ms")
	b.ReportMetric(float64(plain.downtime.Milliseconds())/n, "plain-downtime-ms")
	b.ReportMetric(float64(tpm.elapsed.Milliseconds())/n, "vtpm-migration-ms")
	b.ReportMetric(float64(tpm.downtime.Milliseconds())/n, "vtpm-downtime-ms")
	b.ReportMetric(float64(tpm.elapsed)/float64(plain.elapsed), "migration-ratio")
	b.ReportMetric(float64(tpm.downtime)/float64(plain.downtime), "downtime-ratio")
	b.ReportMetric(float64(requests.Milliseconds())/n, "vtpm-request-ms")
	b.ReportMetric(float64((requests-tpm.elapsed).Milliseconds())/n, "vtpmd-share-ms")
}

// jobTimes sums libvirt's statistics of completed migrations.
type jobTimes struct {
	n                 int
	elapsed, downtime time.Duration
}

// add reads the statistics of the migration of domain name that completed
// on h, its destination.
func (j *jobTimes) add(b *testing.B, h libvirtHost, name string) {
	b.Helper()
	dom, err := h.lv.DomainLookupByName(name)
	if err != nil {
		b.Fatal(err)
	}
	_, params, err := h.lv.DomainGetJobStats(dom, golibvirt.DomainJobStatsCompleted)
	if err != nil {
		b.Fatal(err)
	}
	var elapsed, downtime time.Duration
	for _, p := range params {
		v, ok := p.Value.I.(uint64)
		if !ok {
			continue
		}
		switch p.Field {
		case "time_elapsed":
			elapsed = time.Duration(v) * time.Millisecond
		case "downtime":
			downtime = time.Duration(v) * time.Millisecond
		}
	}
	if elapsed == 0 || downtime == 0 {
		b.Fatalf("libvirt's statistics of the migration of %s to %s: %+v", name, h.name, params)
	}
	j.n++
	j.elapsed += elapsed
	j.downtime += downtime
}
