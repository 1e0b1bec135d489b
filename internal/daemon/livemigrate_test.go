package daemon

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cli"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
)

// liveCluster is a vtpmd server and one libvirt agent on each of the two
// libvirt hosts, named as the hosts are, in libvirt mode mode: each agent
// runs on its host (in its namespaces), as it would on a machine of its
// own.
func liveCluster(t testing.TB, hosts [2]libvirtHost, mode string) (*cluster, map[string]*clusterAgent) {
	t.Helper()
	// A host busy migrating a TCG guest on a shared machine may miss a
	// heartbeat or two: not the test.
	c := newClusterWindow(t, 30*time.Second)
	agents := map[string]*clusterAgent{}
	for _, h := range hosts {
		h.forward(t, c.addr)
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
		agents[h.name] = c.addWrappedAgent(h.enter(), h.name, 8, flags...)
	}
	return c, agents
}

// liveGuest is a running guest with a vTPM of secret security security,
// made through vtpmd: the vTPM placed, the guest defined on its host and
// attached, its first report read from its console. A guest that attests
// runs the guest agent against the server, registered once and trusted.
type liveGuest struct {
	id, name, console string
	on, other         libvirtHost // the host it runs on, the other
	first             tick        // its first report
	c                 *cluster
	attests           bool
	registered        time.Time // when its guest agent registered
}

// startLiveGuest starts the guest; with attest, its guest agent registers
// and attests every second, reaching the server at 10.0.2.2 (QEMU user
// networking's host) on the server's port, as a guest reaches vtpmd
// through its host's network: liveCluster relays that port from each
// host's network namespace to the server. The guest's first boot is
// learned as its policy, and it is trusted.
func startLiveGuest(t testing.TB, c *cluster, hosts [2]libvirtHost, security string, attest bool) *liveGuest {
	t.Helper()
	ctx := context.Background()
	id, dir := uuid.NewString(), t.TempDir()
	if _, err := c.create(id, "hw:tpm_model", "tpm-crb", "hw:tpm_secret_security", security); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	g := &liveGuest{id: id, console: filepath.Join(dir, "console.log"), on: hosts[0], other: hosts[1], c: c, attests: attest}
	if v.Host == hosts[1].name {
		g.on, g.other = hosts[1], hosts[0]
	}
	var o guestOptions
	if attest {
		_, port, _ := strings.Cut(c.addr, ":")
		o = guestOptions{network: true, cmdline: "vtpmd.server=https://10.0.2.2:" + port, files: map[string]string{"etc/vtpmd/ca.pem": c.serverCA}}
	}
	d := migrationGuest(t, hosts, id, dir, o, nil)
	g.name = d.Name
	// The vTPM goes before its guest: its agent detaches it, removes its
	// state and secret.
	t.Cleanup(func() { deleteVTPM(c, id) })
	xml, err := d.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.on.lv.DomainDefineXML(xml); err != nil {
		t.Fatal(err)
	}
	if _, err := c.op.LiveMigrate(ctx, id, api.LiveMigrateRequest{}); client.ErrorCode(err) != api.CodeGuestNotRunning {
		t.Fatalf("live-migrating a vTPM attached to no guest: %v; want %s", err, api.CodeGuestNotRunning)
	}
	if _, err := c.op.Attach(ctx, id, d.Name); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "active")
	r := waitTick(t, g.console, 0)
	g.first = r.ticks[len(r.ticks)-1]
	if r.nv == "" || g.first.nv != r.nv || g.first.pcrs == "none" || strings.HasPrefix(g.first.pcrs, "error") {
		t.Fatalf("the guest's TPM before migrating: wrote NV %q, tick %+v", r.nv, g.first)
	}
	if attest {
		waitReport(t, g.console, "pending verdict (registered, no policy yet)", func(r consoleReport) bool {
			return slices.ContainsFunc(r.verdicts, func(v verdict) bool { return v.verdict == "pending" })
		})
		a, err := c.op.SetPolicy(ctx, client.Instance(id), api.PolicyRequest{Learn: true})
		if err != nil || a.Verdict != "trusted" {
			t.Fatalf("learning the guest's boot as its policy: %+v %v", a, err)
		}
		g.registered = a.RegisteredAt
		g.checkTrusted(t, g.lastTick(t))
	}
	return g
}

// deleteVTPM deletes the vTPM id, if it is there, and waits until its
// host's agent has removed it.
func deleteVTPM(c *cluster, id string) {
	ctx := context.Background()
	if _, err := c.op.Delete(ctx, id); err != nil {
		return
	}
	c.eventually("the vTPM is deleted", func() error {
		_, err := c.op.Get(ctx, id)
		if client.ErrorCode(err) == api.CodeNotFound {
			return nil
		}
		return fmt.Errorf("it is still there (%v)", err)
	})
}

// checkSame fails unless the guest runs on h, booted once, and reports,
// after tick after, the PCRs and NV value it reported first, read from
// its TPM there.
func (g *liveGuest) checkSame(t testing.TB, h, other libvirtHost, after int) {
	t.Helper()
	checkRunsOn(t, h, other, g.name)
	g.checkReports(t, h, after)
}

// checkReports fails unless the guest, which runs on h, booted once and
// reports, after tick after, the PCRs and NV value it reported first (and,
// if it attests, is trusted under its one registration).
func (g *liveGuest) checkReports(t testing.TB, h libvirtHost, after int) {
	t.Helper()
	now := g.lastTick(t)
	r := waitTick(t, g.console, after)
	if len(r.boots) != 1 {
		t.Fatalf("the guest booted %d times; want once: it must keep running", len(r.boots))
	}
	if tk := r.ticks[len(r.ticks)-1]; tk.pcrs != g.first.pcrs || tk.nv != g.first.nv {
		t.Fatalf("on %s the guest reports PCRs %s, NV %s; before, %s and %s", h.name, tk.pcrs, tk.nv, g.first.pcrs, g.first.nv)
	}
	if g.attests {
		g.checkTrusted(t, now)
	}
}

// checkTrusted fails unless the guest agent's first verdict on a quote
// made after tick after is trusted, as the server says too, under the
// guest's one registration: it never registered again. A quote whose
// request failed (a connection the migration cut) is not a verdict: the
// next is.
func (g *liveGuest) checkTrusted(t testing.TB, after int) {
	t.Helper()
	var got verdict
	r := waitReport(t, g.console, fmt.Sprintf("verdict after tick %d", after), func(r consoleReport) bool {
		for _, got = range r.verdicts {
			if got.n > after && got.verdict != "error" {
				return true
			}
		}
		return false
	})
	for _, v := range r.verdicts {
		if v.n > after && v.verdict == "error" {
			t.Logf("the guest agent's attestation after tick %d failed: %s", v.n, v.reason)
		}
	}
	if got.verdict != "trusted" || r.registered != 1 {
		t.Fatalf("the guest agent, registered %d times, says %s (%s) after tick %d; want trusted, registered once", r.registered, got.verdict, got.reason, after)
	}
	a, err := g.c.op.Attestation(context.Background(), client.Instance(g.id))
	if err != nil || a.State != "registered" || a.Verdict != "trusted" || !a.RegisteredAt.Equal(g.registered) {
		t.Fatalf("attestation of %s: %+v %v; want trusted, registered at %s", g.id, a, err, g.registered)
	}
	t.Logf("the guest agent's quote after tick %d (tick %d): trusted, under the registration of %s", after, got.n, g.registered.Format(time.RFC3339Nano))
}

// lastTick is the number of the guest's last report.
func (g *liveGuest) lastTick(t testing.TB) int {
	r := readConsole(t, g.console)
	return r.ticks[len(r.ticks)-1].n
}

// hasLibvirtSecret says whether h's libvirtd has the secret the guest's
// TPM is keyed by (emulator mode).
func hasLibvirtSecret(t *testing.T, h libvirtHost, secret string) bool {
	t.Helper()
	_, err := h.lv.SecretLookupByUUID(golibvirt.UUID(uuid.MustParse(secret)))
	return err == nil
}

// tpmSecret is the libvirt secret of the guest's emulator TPM on h.
func (g *liveGuest) tpmSecret(t *testing.T, h libvirtHost) string {
	t.Helper()
	dom, err := h.lv.DomainLookupByName(g.name)
	if err != nil {
		t.Fatal(err)
	}
	tpms := definition(t, h.lv, dom).Devices.TPMs
	if len(tpms) != 1 || tpms[0].Backend.Emulator == nil || tpms[0].Backend.Emulator.Encryption == nil {
		t.Fatalf("the guest's TPM on %s: %+v", h.name, tpms)
	}
	return tpms[0].Backend.Emulator.Encryption.Secret
}

// hasTPMState says whether h holds state of the vTPM id: libvirt's
// (emulator mode) or vtpmd's (external mode, in the agent's data dir).
func hasTPMState(t *testing.T, h libvirtHost, a *clusterAgent, id string) bool {
	t.Helper()
	if _, err := os.Stat(filepath.Join(h.dir, "lib", "swtpm", id)); err == nil {
		return true
	}
	_, err := os.Stat(filepath.Join(a.dir, "vtpms", id))
	return err == nil
}

// TestClusterLiveMigrate live-migrates running guests with their vTPMs
// between the two libvirt hosts and back through vtpmd (a server, an
// agent on each host): in emulator and external mode, each with each
// secret-security mode. Each guest keeps running (one boot, its reports go
// on) and reads the same PCRs and the NV value it wrote before from its
// TPM on the other host; its guest agent's quotes after each move are
// trusted under the registration it made at boot, which it never makes
// again; the record names the host the guest runs on; the
// old host keeps no state; the libvirt secret is on the guest's host
// alone for host mode, and on no host once the guest runs for user and
// deployment. The refusals have their codes. The first guest's host is then
// emptied with vtpmctl host evacuate-live, which live-migrates the guest
// to the other host, where it runs on with its TPM.
func TestClusterLiveMigrate(t *testing.T) {
	hosts := twoLibvirtHosts(t)
	t.Run("emulator", func(t *testing.T) {
		c, agents := liveCluster(t, hosts, "emulator")
		for i, security := range []string{"user", "host", "deployment"} {
			t.Run(security, func(t *testing.T) { testLiveMigrate(t, c, agents, hosts, "emulator", security, i == 0) })
		}
	})
	t.Run("external", func(t *testing.T) {
		c, agents := liveCluster(t, hosts, "external")
		for _, security := range []string{"user", "host", "deployment"} {
			t.Run(security, func(t *testing.T) { testLiveMigrate(t, c, agents, hosts, "external", security, false) })
		}
	})
}

func testLiveMigrate(t *testing.T, c *cluster, agents map[string]*clusterAgent, hosts [2]libvirtHost, mode, security string, first bool) {
	ctx := context.Background()
	g := startLiveGuest(t, c, hosts, security, true)
	if first {
		_, err := c.op.LiveMigrate(ctx, g.id, api.LiveMigrateRequest{Host: g.on.name})
		wantCode(t, err, api.CodeTargetIsSource)
		_, err = c.op.LiveMigrate(ctx, g.id, api.LiveMigrateRequest{Host: "nowhere"})
		wantCode(t, err, api.CodeNotFound)
		_, err = client.New("unix://"+filepath.Join(c.dir, "api.sock"), "p1").LiveMigrate(ctx, g.id, api.LiveMigrateRequest{})
		wantCode(t, err, api.CodeForbidden)
	}
	for i, leg := range [][2]libvirtHost{{g.on, g.other}, {g.other, g.on}} {
		from, to := leg[0], leg[1]
		last := g.lastTick(t)
		req := api.LiveMigrateRequest{}
		if i == 1 {
			req.Host = to.name // and placement's choice the first time
		}
		got, err := c.op.LiveMigrate(ctx, g.id, req)
		if err != nil {
			t.Fatalf("live-migrating from %s to %s: %v", from.name, to.name, err)
		}
		if got.Host != to.name {
			t.Fatalf("the vTPM is on %s after live-migrating to %s", got.Host, to.name)
		}
		g.checkSame(t, to, from, last)
		c.wait(g.id, "active")
		if hasTPMState(t, from, agents[from.name], g.id) || !hasTPMState(t, to, agents[to.name], g.id) {
			t.Fatalf("TPM state after migrating from %s to %s: on %s %v, on %s %v", from.name, to.name,
				from.name, hasTPMState(t, from, agents[from.name], g.id), to.name, hasTPMState(t, to, agents[to.name], g.id))
		}
		if mode == "emulator" {
			if _, err := os.Stat(filepath.Join(to.dir, "lib", "swtpm", g.id, "tpm2", swtpmhost.IdentityFile)); err != nil {
				t.Fatalf("%s does not know the vTPM as one vtpmd made: %v", to.name, err)
			}
			secret := g.tpmSecret(t, to)
			if on, off := hasLibvirtSecret(t, to, secret), hasLibvirtSecret(t, from, secret); off || on != (security == "host") {
				t.Fatalf("secret security %s, the guest on %s: the libvirt secret is defined there: %v, on %s: %v", security, to.name, on, from.name, off)
			}
		}
	}
	evs, err := c.op.Events(ctx, g.id)
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
	if first {
		g.evacuateLive(t, agents)
	}
}

// evacuateLive empties the host the guest runs on, its only vTPM, with
// vtpmctl host evacuate-live, as an operator before maintenance: the
// host is drained, and the guest is live-migrated to the other host, where
// it runs on (booted once, the same PCRs and NV value, still trusted) with
// its TPM state there alone. The host is undrained after.
func (g *liveGuest) evacuateLive(t *testing.T, agents map[string]*clusterAgent) {
	ctx := context.Background()
	from, to := g.on, g.other
	if v, err := g.c.op.Get(ctx, g.id); err != nil || v.Host != from.name {
		t.Fatalf("before evacuating %s: %+v, %v", from.name, v, err)
	}
	t.Cleanup(func() { g.c.op.UndrainHost(ctx, from.name) })
	last := g.lastTick(t)
	var out, errOut bytes.Buffer
	if code := cli.Main(ctx, []string{"--server", "unix://" + filepath.Join(g.c.dir, "api.sock"), "host", "evacuate-live", from.name}, &out, &errOut); code != 0 {
		t.Fatalf("vtpmctl host evacuate-live %s: %d\n%s%s", from.name, code, out.String(), errOut.String())
	}
	t.Logf("vtpmctl host evacuate-live %s:\n%s", from.name, out.String())
	for _, want := range []string{"evacuating host " + from.name + " live: 1 vTPMs", "[1/1] " + g.id + ": live-migrated to " + to.name,
		"host " + from.name + ": 1 live-migrated, 0 cold-migrated, 0 refused"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("no %q in the output", want)
		}
	}
	if h, err := g.c.op.GetHost(ctx, from.name); err != nil || !h.Draining {
		t.Fatalf("%s after the evacuation: %+v, %v; want it draining", from.name, h, err)
	}
	if v, err := g.c.op.Get(ctx, g.id); err != nil || v.Host != to.name {
		t.Fatalf("after evacuating %s: %+v, %v; want the vTPM on %s", from.name, v, err, to.name)
	}
	g.checkSame(t, to, from, last)
	g.c.wait(g.id, "active")
	if hasTPMState(t, from, agents[from.name], g.id) || !hasTPMState(t, to, agents[to.name], g.id) {
		t.Fatalf("TPM state after evacuating %s: there %v, on %s %v", from.name, hasTPMState(t, from, agents[from.name], g.id),
			to.name, hasTPMState(t, to, agents[to.name], g.id))
	}
}

// TestClusterLiveMigrateServerKilled kills the server as soon as the
// target is prepared, so that it stops before it knows where the guest
// runs (the source may be sending it, or about to). Another request within
// the live migration's lease is refused (migration_in_progress); after it,
// the same request resumes the move: the target's agent says where the
// guest runs, and the move ends with the guest and the record on the
// target, the guest running throughout with its TPM, and nothing left on
// the source.
func TestClusterLiveMigrateServerKilled(t *testing.T) {
	hosts := twoLibvirtHosts(t)
	c, agents := liveCluster(t, hosts, "emulator")
	ctx := context.Background()
	g := startLiveGuest(t, c, hosts, "user", true)
	last := g.lastTick(t)
	go c.op.LiveMigrate(ctx, g.id, api.LiveMigrateRequest{Host: g.other.name}) // cut short below
	c.eventually("the target is prepared", func() error {
		evs, err := c.op.Events(ctx, g.id)
		if err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.Action == "live migration prepared" {
				return nil
			}
		}
		return fmt.Errorf("no %q event yet", "live migration prepared")
	})
	stop(c.server, syscall.SIGKILL)
	c.startServer()
	if _, err := c.op.LiveMigrate(ctx, g.id, api.LiveMigrateRequest{Host: g.other.name}); client.ErrorCode(err) != api.CodeMigrationInProgress {
		t.Fatalf("a live migration within its lease, asked again: %v; want %s", err, api.CodeMigrationInProgress)
	}
	var got api.VTPM
	c.eventually("the live migration resumes once its lease is over", func() (err error) {
		got, err = c.op.LiveMigrate(ctx, g.id, api.LiveMigrateRequest{Host: g.other.name})
		return err
	})
	if got.Host != g.other.name {
		t.Fatalf("the vTPM is on %s after the resumed live migration to %s", got.Host, g.other.name)
	}
	g.checkSame(t, g.other, g.on, last)
	c.wait(g.id, "active")
	if hasTPMState(t, g.on, agents[g.on.name], g.id) || !hasTPMState(t, g.other, agents[g.other.name], g.id) {
		t.Fatalf("TPM state after the resumed live migration: on %s %v, on %s %v", g.on.name, hasTPMState(t, g.on, agents[g.on.name], g.id),
			g.other.name, hasTPMState(t, g.other, agents[g.other.name], g.id))
	}
	logLiveEvents(t, c, g.id)
}

// logLiveEvents logs the live migration events of id.
func logLiveEvents(t *testing.T, c *cluster, id string) {
	t.Helper()
	evs, err := c.op.Events(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range evs.Items {
		if strings.HasPrefix(e.Action, "live") {
			t.Logf("%s: %s", e.Action, e.Detail)
		}
	}
}

// TestClusterLiveMigrateSourceKilled kills the source's agent as soon as
// libvirt migrates the guest. The request ends once the server reads the
// source down: where the guest runs decides (the target's agent says),
// and the record names that host, the guest running there with its TPM
// (one boot, same PCRs and NV value, trusted under its one registration)
// and on no other; a guest that stayed on the source left nothing on the
// target. Once the source's agent is back, the same request finishes the
// move: the guest and the record on the target, and nothing of the vTPM
// or the guest left on the source.
func TestClusterLiveMigrateSourceKilled(t *testing.T) {
	hosts := twoLibvirtHosts(t)
	c, agents := liveCluster(t, hosts, "emulator")
	ctx := context.Background()
	g := startLiveGuest(t, c, hosts, "user", true)
	source, target := g.on, g.other
	secret := g.tpmSecret(t, source)
	dom, err := source.lv.DomainLookupByName(g.name)
	if err != nil {
		t.Fatal(err)
	}
	migrating := func() bool {
		typ, _, _, _, _, _, _, _, _, _, _, _, err := source.lv.DomainGetJobInfo(dom)
		return err == nil && typ != 0 // VIR_DOMAIN_JOB_NONE
	}
	last := g.lastTick(t)
	done := make(chan error, 1)
	go func() {
		_, err := c.op.LiveMigrate(ctx, g.id, api.LiveMigrateRequest{Host: target.name})
		done <- err
	}()
	// A machine too loaded to see the job between two looks sees the
	// request end: the kill then comes after, and the outcome must be the
	// same; as when libvirt finishes in the moment the kill takes.
	ended := false
	c.eventually("libvirt migrates the guest", func() error {
		select {
		case err = <-done:
			ended = true
			return nil
		default:
		}
		if !migrating() {
			return fmt.Errorf("no job on %s", g.name)
		}
		return nil
	})
	stop(agents[source.name].cmd, syscall.SIGKILL)
	t.Logf("killed the agent of %s; libvirt still migrating the guest: %v; the request over: %v", source.name, migrating(), ended)
	if !ended {
		err = <-done
	}
	t.Logf("the live migration, its source's agent killed: %v", err)
	finished := ended && err == nil // before the kill
	logLiveEvents(t, c, g.id)
	v, err := c.op.Get(ctx, g.id)
	if err != nil {
		t.Fatal(err)
	}
	on, other := source, target
	if v.Host == target.name {
		on, other = target, source
	}
	// A source whose libvirt client went away before the end of its
	// migration may keep the guest's definition, shut off, until the
	// move's cleaning: only running is checked here.
	checkRunning(t, on, g.name)
	if d, err := other.lv.DomainLookupByName(g.name); err == nil {
		st, reason, err := other.lv.DomainGetState(d, 0)
		if err != nil || golibvirt.DomainState(st) == golibvirt.DomainRunning {
			t.Fatalf("%s runs on %s too (%v)", g.name, other.name, err)
		}
		t.Logf("%s keeps the guest's definition, state %d (reason %d), until the move's cleaning", other.name, st, reason)
	}
	g.checkReports(t, on, last)
	if on == source {
		if hasTPMState(t, target, agents[target.name], g.id) || hasLibvirtSecret(t, target, secret) {
			t.Fatalf("the guest stayed on %s, but %s holds state or the secret of %s", source.name, target.name, g.id)
		}
		if _, err := target.lv.DomainLookupByName(g.name); !golibvirt.IsNotFound(err) {
			t.Fatalf("the guest stayed on %s, but %s has it defined (%v)", source.name, target.name, err)
		}
	}

	c.startAgent(agents[source.name])
	last = g.lastTick(t)
	if !finished {
		got, err := c.op.LiveMigrate(ctx, g.id, api.LiveMigrateRequest{Host: target.name})
		if err != nil || got.Host != target.name {
			t.Fatalf("live-migrating again once the source's agent is back: on %q, %v; want %s", got.Host, err, target.name)
		}
	}
	g.checkSame(t, target, source, last)
	c.wait(g.id, "active")
	if hasTPMState(t, source, agents[source.name], g.id) || hasLibvirtSecret(t, source, secret) {
		t.Fatalf("%s holds state or the secret of %s after the move", source.name, g.id)
	}
	// Now, while the restarted agent runs (see TargetKilled).
	deleteVTPM(c, g.id)
}
