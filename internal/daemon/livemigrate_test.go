package daemon

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
)

// liveCluster is a vtpmd server and one libvirt agent on each of the two
// libvirt hosts, named as the hosts are, in libvirt mode mode: each agent
// runs on its host (in its namespaces), as it would on a machine of its
// own.
func liveCluster(t *testing.T, hosts [2]libvirtHost, mode string) (*cluster, map[string]*clusterAgent) {
	t.Helper()
	c := newCluster(t)
	agents := map[string]*clusterAgent{}
	for _, h := range hosts {
		flags := []string{"--backend", "libvirt", "--libvirt-mode", mode, "--enable-vtpm", "--libvirt-migration-uri", h.uri}
		if mode == "external" {
			// Both agents are on this machine: their swtpm sockets apart.
			sockets, err := os.MkdirTemp("/run", "vtpmd-"+h.name+"-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(sockets) })
			flags = append(flags, "--socket-dir", sockets)
		}
		agents[h.name] = c.addAgentIn(h.enter(), h.name, 2, flags...)
	}
	return c, agents
}

// TestClusterLiveMigrate live-migrates a running guest with its vTPM
// between the two libvirt hosts and back, through vtpmd: a server and an
// agent per host, in emulator mode with secret security user. The guest
// keeps running (one boot, its ticks go on), reads the same PCRs and the
// NV value it wrote before from its TPM on the other host; the record
// names the host the guest runs on; the old host keeps no state and no
// libvirt secret, nor does the new one once the guest runs (user mode).
// The refusals have their codes.
func TestClusterLiveMigrate(t *testing.T) {
	hosts := twoLibvirtHosts(t)
	c, _ := liveCluster(t, hosts, "emulator")
	ctx := context.Background()
	id, dir := uuid.NewString(), t.TempDir()
	d := migrationGuest(t, hosts, id, dir, nil)
	xml, err := d.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hosts[0].lv.DomainDefineXML(xml); err != nil {
		t.Fatal(err)
	}
	if _, err := c.create(id, "hw:tpm_model", "tpm-crb", "hw:tpm_secret_security", "user"); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	if v.Host != hosts[0].name {
		t.Fatalf("placed on %s, want %s", v.Host, hosts[0].name)
	}
	_, err = c.op.LiveMigrate(ctx, id, api.LiveMigrateRequest{})
	wantCode(t, err, api.CodeGuestNotRunning)
	if _, err := c.op.Attach(ctx, id, d.Name); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "active")
	console := filepath.Join(dir, "console.log")
	before := waitTick(t, console, 0)
	first := before.ticks[len(before.ticks)-1]
	if before.nv == "" || first.nv != before.nv || first.pcrs == "none" || strings.HasPrefix(first.pcrs, "error") {
		t.Fatalf("the guest's TPM before migrating: wrote NV %q, tick %+v", before.nv, first)
	}
	_, err = c.op.LiveMigrate(ctx, id, api.LiveMigrateRequest{Host: hosts[0].name})
	wantCode(t, err, api.CodeTargetIsSource)
	_, err = c.op.LiveMigrate(ctx, id, api.LiveMigrateRequest{Host: "nowhere"})
	wantCode(t, err, api.CodeNotFound)

	for i, leg := range [][2]libvirtHost{{hosts[0], hosts[1]}, {hosts[1], hosts[0]}} {
		from, to := leg[0], leg[1]
		last := readConsole(t, console).ticks
		req := api.LiveMigrateRequest{}
		if i == 1 {
			req.Host = to.name
		}
		got, err := c.op.LiveMigrate(ctx, id, req)
		if err != nil {
			t.Fatalf("live-migrating from %s to %s: %v", from.name, to.name, err)
		}
		if got.Host != to.name {
			t.Fatalf("the vTPM is on %s after live-migrating to %s", got.Host, to.name)
		}
		checkRunsOn(t, to, from, d.Name)
		after := waitTick(t, console, last[len(last)-1].n)
		if len(after.boots) != 1 {
			t.Fatalf("the guest booted %d times; want once: it must keep running across the migration", len(after.boots))
		}
		if tk := after.ticks[len(after.ticks)-1]; tk.pcrs != first.pcrs || tk.nv != first.nv {
			t.Fatalf("on %s the guest reports PCRs %s, NV %s; before migrating, %s and %s", to.name, tk.pcrs, tk.nv, first.pcrs, first.nv)
		}
		c.wait(id, "active")
		state := filepath.Join(to.dir, "lib", "swtpm", id, "tpm2")
		if _, err := os.Stat(filepath.Join(state, swtpmhost.IdentityFile)); err != nil {
			t.Fatalf("%s does not know the vTPM as one vtpmd made: %v", to.name, err)
		}
		if _, err := os.Stat(filepath.Join(from.dir, "lib", "swtpm", id)); !os.IsNotExist(err) {
			t.Fatalf("TPM state left on %s after migrating away (%v)", from.name, err)
		}
		dom, err := to.lv.DomainLookupByName(d.Name)
		if err != nil {
			t.Fatal(err)
		}
		tpms := definition(t, to.lv, dom).Devices.TPMs
		if len(tpms) != 1 || tpms[0].Backend.Emulator == nil || tpms[0].Backend.Emulator.Encryption == nil {
			t.Fatalf("the guest's TPM on %s: %+v", to.name, tpms)
		}
		secret := uuid.MustParse(tpms[0].Backend.Emulator.Encryption.Secret)
		for _, h := range hosts {
			if _, err := h.lv.SecretLookupByUUID(golibvirt.UUID(secret)); err == nil {
				t.Fatalf("the libvirt secret of a user-mode vTPM is defined on %s with the guest running", h.name)
			}
		}
	}
	evs, err := c.op.Events(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, e := range evs.Items {
		actions = append(actions, e.Action)
	}
	if n := strings.Count(strings.Join(actions, ","), "live-migrated"); n != 2 {
		t.Fatalf("events: %v; want two live-migrated", actions)
	}
}
