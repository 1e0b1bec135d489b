package daemon

import (
	"context"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
)

// BenchmarkGuestStart starts the same kind of guest with a vTPM (through
// vtpmd: start request until the agent reports it active) and without one
// (libvirt's DomainCreate alone), one at a time in alternating order, and
// reports both and their ratio. It also reports how long a new vTPM takes to be ready (create
// until active), and to be attached to a defined guest. The guests run
// under TCG (see guestDomainType); the name says so (accel=tcg), checked
// with QEMU itself.
//
//	go test -run '^$' -bench GuestStart -benchtime 10x ./internal/daemon
func BenchmarkGuestStart(b *testing.B) {
	for _, mode := range []string{"emulator", "external"} {
		b.Run(mode+"/accel="+guestAccelName, func(b *testing.B) { benchGuestStart(b, mode) })
	}
}

func benchGuestStart(b *testing.B, mode string) {
	lv := connectLibvirt(b)
	dir := b.TempDir()
	u := startLibvirtDaemon(b, dir, mode)
	ctx := context.Background()
	id := uuid.NewString()
	withTPM := defineGuest(b, lv, id, dir)
	plain := defineGuest(b, lv, uuid.NewString(), b.TempDir())

	t0 := time.Now()
	if _, err := u.c.Create(ctx, api.CreateVTPMRequest{InstanceID: id, Project: "bench",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}}); err != nil {
		b.Fatal(err)
	}
	u.wait(b, id, "active")
	ready := time.Since(t0)
	t0 = time.Now()
	if _, err := u.c.Attach(ctx, id, withTPM.Name); err != nil {
		b.Fatal(err)
	}
	u.wait(b, id, "active")
	attached := time.Since(t0)
	if _, err := u.c.Stop(ctx, id); err != nil {
		b.Fatal(err)
	}
	u.wait(b, id, "stopped")

	// Each guest starts on an otherwise idle machine (the other is off: a
	// TCG guest keeps a core busy), and the order alternates so that drift
	// on the machine favours neither.
	startWith := func() time.Duration {
		t0 := time.Now()
		if _, err := u.c.Start(ctx, id); err != nil {
			b.Fatal(err)
		}
		u.wait(b, id, "active")
		d := time.Since(t0)
		b.StopTimer()
		if _, err := u.c.Stop(ctx, id); err != nil {
			b.Fatal(err)
		}
		u.wait(b, id, "stopped")
		b.StartTimer()
		return d
	}
	startWithout := func() time.Duration {
		t0 := time.Now()
		if err := lv.DomainCreate(plain); err != nil {
			b.Fatal(err)
		}
		d := time.Since(t0)
		b.StopTimer()
		if err := lv.DomainDestroy(plain); err != nil {
			b.Fatal(err)
		}
		waitShutoff(b, lv, plain)
		b.StartTimer()
		return d
	}
	// The accelerator in the benchmark's name is the one QEMU uses.
	if err := lv.DomainCreate(plain); err != nil {
		b.Fatal(err)
	}
	if got := guestAccel(b, lv, plain); got != guestAccelName {
		b.Fatalf("the guest runs under %s, not %s", got, guestAccelName)
	}
	if err := lv.DomainDestroy(plain); err != nil {
		b.Fatal(err)
	}
	waitShutoff(b, lv, plain)

	var with, without time.Duration
	b.ResetTimer()
	for i := range b.N {
		if i%2 == 0 {
			with += startWith()
			without += startWithout()
		} else {
			without += startWithout()
			with += startWith()
		}
	}
	n := float64(b.N)
	b.ReportMetric(float64(with.Milliseconds())/n, "ms/start-with-vtpm")
	b.ReportMetric(float64(without.Milliseconds())/n, "ms/start-without")
	b.ReportMetric(with.Seconds()/without.Seconds(), "ratio")
	b.ReportMetric(float64(ready.Milliseconds()), "ms-vtpm-ready")
	b.ReportMetric(float64(attached.Milliseconds()), "ms-attach+first-start")
}

func waitShutoff(b testing.TB, lv *golibvirt.Libvirt, dom golibvirt.Domain) {
	for {
		st, _, err := lv.DomainGetState(dom, 0)
		if err != nil {
			b.Fatal(err)
		}
		if golibvirt.DomainState(st) == golibvirt.DomainShutoff {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
