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
// the ratios; the whole call (libvirt's peer-to-peer migrate for the guest
// without, the live-migrate request for the vTPM) and vtpmd's share: the
// request less the plain guest's call, and vtpmd's own steps before and
// after libvirt's migration, from their events.
func BenchmarkLiveMigration(b *testing.B) {
	hosts := twoLibvirtHosts(b)
	c, _ := liveCluster(b, hosts, "emulator")
	ctx := context.Background()
	g := startLiveGuest(b, c, hosts, "user", false)

	id, dir := uuid.NewString(), b.TempDir()
	d := migrationGuest(b, hosts, id, dir, guestOptions{}, nil)
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
	var calls, requests time.Duration
	b.ResetTimer()
	for b.Loop() {
		start := time.Now()
		migrateLive(b, plainOn, plainOther, d.Name)
		calls += time.Since(start)
		plain.add(b, plainOther, d.Name)
		plainOn, plainOther = plainOther, plainOn

		start = time.Now()
		if _, err := c.op.LiveMigrate(ctx, g.id, api.LiveMigrateRequest{Host: g.other.name}); err != nil {
			b.Fatal(err)
		}
		requests += time.Since(start)
		tpm.add(b, g.other, g.name)
		g.on, g.other = g.other, g.on
	}
	b.StopTimer()
	// vtpmd's own steps, from their events: started → prepared (the
	// target's agent), sent → live-migrated (both agents' cleanup).
	evs, err := c.op.Events(ctx, g.id)
	if err != nil {
		b.Fatal(err)
	}
	var prepare, clean time.Duration
	at := map[string]time.Time{}
	for _, e := range evs.Items {
		at[e.Action] = e.At
		switch e.Action {
		case "live migration prepared":
			prepare += e.At.Sub(at["live migration started"])
		case "live-migrated":
			clean += e.At.Sub(at["live migration sent"])
		}
	}
	n := float64(plain.n)
	b.ReportMetric(float64(prepare.Milliseconds())/n, "vtpmd-prepare-ms")
	b.ReportMetric(float64(clean.Milliseconds())/n, "vtpmd-clean-ms")
	b.ReportMetric(float64(plain.elapsed.Milliseconds())/n, "plain-migration-ms")
	b.ReportMetric(float64(plain.downtime.Milliseconds())/n, "plain-downtime-ms")
	b.ReportMetric(float64(tpm.elapsed.Milliseconds())/n, "vtpm-migration-ms")
	b.ReportMetric(float64(tpm.downtime.Milliseconds())/n, "vtpm-downtime-ms")
	b.ReportMetric(float64(tpm.elapsed)/float64(plain.elapsed), "migration-ratio")
	b.ReportMetric(float64(tpm.downtime)/float64(plain.downtime), "downtime-ratio")
	b.ReportMetric(float64(calls.Milliseconds())/n, "plain-call-ms")
	b.ReportMetric(float64(requests.Milliseconds())/n, "vtpm-request-ms")
	b.ReportMetric(float64(requests)/float64(calls), "request-ratio")
	b.ReportMetric(float64((requests-calls).Milliseconds())/n, "vtpmd-share-ms")
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
