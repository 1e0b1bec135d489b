package daemon

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// TestClusterLiveMigrateTargetKilled kills the target's agent while
// libvirt sends the guest to it, in emulator mode (libvirt's swtpm) and in
// external mode (vtpmd's swtpm, started on the target by the agent
// killed). The migration is slowed to 1 MiB/s (virsh migrate-setspeed),
// at which sending the guest's memory takes minutes: it is under way
// until the server, once it reads the target down, cancels it. The request fails with host_unavailable naming the
// target; the guest runs on its host throughout, the same domain, booted
// once, with the same PCRs and NV value read from its TPM and still
// trusted; the record stays there. Once the target's agent is back it
// carries out the abort left for it, and the target holds nothing of the
// vTPM: no state, no libvirt secret, no guest, no swtpm. The vTPM then
// live-migrates there.
func TestClusterLiveMigrateTargetKilled(t *testing.T) {
	hosts := twoLibvirtHosts(t)
	for _, mode := range []string{"emulator", "external"} {
		t.Run(mode, func(t *testing.T) { testLiveMigrateTargetKilled(t, hosts, mode) })
	}
}

func testLiveMigrateTargetKilled(t *testing.T, hosts [2]libvirtHost, mode string) {
	c, agents := liveCluster(t, hosts, mode)
	ctx := context.Background()
	g := startLiveGuest(t, c, hosts, "user", true)
	source, target := g.on, g.other
	var secret string
	if mode == "emulator" {
		secret = g.tpmSecret(t, source)
	}
	dom, err := source.lv.DomainLookupByName(g.name)
	if err != nil {
		t.Fatal(err)
	}
	// The slowest migration libvirt runs; set back before the vTPM
	// migrates again.
	speed, err := source.lv.DomainMigrateGetMaxSpeed(dom, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := source.lv.DomainMigrateSetMaxSpeed(dom, 1, 0); err != nil {
		t.Fatal(err)
	}
	sent := func() (job bool, processed uint64) {
		typ, _, _, _, _, _, _, mem, _, _, _, _, err := source.lv.DomainGetJobInfo(dom)
		return err == nil && typ != 0, mem // VIR_DOMAIN_JOB_NONE
	}
	last := g.lastTick(t)
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		_, err := c.op.LiveMigrate(ctx, g.id, api.LiveMigrateRequest{Host: target.name})
		done <- err
	}()
	c.eventually("libvirt sends the guest's memory", func() error {
		select {
		case err := <-done:
			t.Fatalf("the live migration ended before libvirt sent anything: %v", err)
		default:
		}
		if job, mem := sent(); !job || mem == 0 {
			return fmt.Errorf("job %v, %d bytes of memory sent", job, mem)
		}
		return nil
	})
	prepared := swtpmOn(t, target, g.id)
	if mode == "external" && len(prepared) == 0 {
		t.Fatalf("no swtpm of %s on %s while the guest is sent there", g.id, target.name)
	}
	stop(agents[target.name].cmd, syscall.SIGKILL)
	job, mem := sent()
	if !job {
		t.Fatal("libvirt's migration was over when the target's agent was killed")
	}
	t.Logf("killed the agent of %s %s after the request, %d bytes of memory sent; swtpm there: %q", target.name,
		time.Since(start).Round(time.Millisecond), mem, prepared)

	var got error
	select {
	case got = <-done:
	case <-time.After(5 * time.Minute):
		t.Fatal("the live migration did not end within 5 minutes of its target's agent killed")
	}
	t.Logf("the live migration ended after %s: %v", time.Since(start).Round(time.Millisecond), got)
	logLiveEvents(t, c, g.id)
	if client.ErrorCode(got) != api.CodeHostUnavailable || !strings.Contains(got.Error(), "Host "+target.name+" went down") {
		t.Fatalf("the live migration, its target's agent killed: %v; want %s naming %s", got, api.CodeHostUnavailable, target.name)
	}
	if job, _ := sent(); job {
		t.Fatal("libvirt still migrates the guest after the request failed")
	}
	if err := source.lv.DomainMigrateSetMaxSpeed(dom, speed, 0); err != nil {
		t.Fatal(err)
	}
	now, err := source.lv.DomainLookupByName(g.name)
	if err != nil || now.ID != dom.ID {
		t.Fatalf("the guest on %s after the failed migration: domain %d (%v); want the same domain, %d", source.name, now.ID, err, dom.ID)
	}
	checkRunning(t, source, g.name)
	v, err := c.op.Get(ctx, g.id)
	if err != nil || v.Host != source.name {
		t.Fatalf("after the failed live migration the vTPM is on %q (%v); want %s", v.Host, err, source.name)
	}
	g.checkReports(t, source, last)

	c.startAgent(agents[target.name])
	c.eventually("the target holds nothing of the vTPM", func() error {
		switch {
		case hasTPMState(t, target, agents[target.name], g.id):
			return fmt.Errorf("TPM state of %s on %s", g.id, target.name)
		case secret != "" && hasLibvirtSecret(t, target, secret):
			return fmt.Errorf("the libvirt secret of %s on %s", g.id, target.name)
		case len(swtpmOn(t, target, g.id)) > 0:
			return fmt.Errorf("swtpm of %s on %s: %q", g.id, target.name, swtpmOn(t, target, g.id))
		}
		if _, err := target.lv.DomainLookupByName(g.name); !golibvirt.IsNotFound(err) {
			return fmt.Errorf("guest %s on %s (%v)", g.name, target.name, err)
		}
		return nil
	})
	// And the vTPM still migrates, at full speed.
	last = g.lastTick(t)
	if _, err := c.op.LiveMigrate(ctx, g.id, api.LiveMigrateRequest{}); err != nil {
		t.Fatal(err)
	}
	g.checkSame(t, target, source, last)
	// Now, while the restarted agent runs: test cleanups run last first,
	// and its own stops it.
	deleteVTPM(c, g.id)
}

// swtpmOn lists "pid: cmdline" of the swtpm processes on host h (in its
// mount namespace) whose arguments name id: libvirt's (its state
// directory is named by the domain's UUID, the instance id) or vtpmd's.
func swtpmOn(t testing.TB, h libvirtHost, id string) []string {
	t.Helper()
	ns, err := os.Stat(filepath.Join(h.root, h.name+".mnt"))
	if err != nil {
		t.Fatal(err)
	}
	return swtpmtest.ProcessesWhere(func(pid string, cmdline []byte) bool {
		mnt, err := os.Stat(filepath.Join("/proc", pid, "ns", "mnt"))
		return bytes.Contains(cmdline, []byte(id)) && err == nil && os.SameFile(mnt, ns)
	})
}
