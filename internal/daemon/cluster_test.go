package daemon

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cli"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// cluster is a control plane and hosts on this machine, each its own vtpmd
// process: a server on a throwaway PostgreSQL database, with HTTPS, and
// agents with their own data dirs and host names, enrolled with join
// tokens as an operator enrols them.
type cluster struct {
	t        testing.TB
	bin      string
	dsn      string
	addr     string // the server's, fixed across its restarts
	serverCA string // trusts the server's TLS certificate
	cert     string
	key      string
	dir      string        // the server's data dir
	window   time.Duration // the server's heartbeat window
	server   *exec.Cmd
	op       *client.Client // the operator, on the server's socket
	agents   map[string]*clusterAgent
}

// clusterAgent is one host's vtpmd agent.
type clusterAgent struct {
	name string
	dir  string
	args []string
	wrap []string // a command that runs vtpmd (nsenter, say); none for vtpmd itself
	cmd  *exec.Cmd
}

func newCluster(t testing.TB) *cluster {
	t.Helper()
	return newClusterWindow(t, 4*time.Second)
}

// newClusterWindow is newCluster whose server reads a host down after
// window without a heartbeat.
func newClusterWindow(t testing.TB, window time.Duration) *cluster {
	t.Helper()
	swtpmtest.Require(t)
	dir := t.TempDir()
	c := &cluster{t: t, bin: buildVtpmd(t), dsn: pgtest.DSN(t), addr: freeAddr(t), dir: filepath.Join(dir, "server"),
		window: window, agents: map[string]*clusterAgent{}}
	c.serverCA, c.cert, c.key = writeTestPKI(t, dir)
	c.op = client.New("unix://"+filepath.Join(c.dir, "api.sock"), "")
	c.startServer()
	return c
}

// start runs vtpmd with args, its output appended to log, shown if the
// test fails; it is killed when the test ends.
func (c *cluster) start(log string, args ...string) *exec.Cmd {
	c.t.Helper()
	return c.startWrapped(log, nil, args...)
}

// startWrapped is start with vtpmd run by the command wrap, which must
// exec it (so that killing the process kills vtpmd).
func (c *cluster) startWrapped(log string, wrap []string, args ...string) *exec.Cmd {
	c.t.Helper()
	argv := append(append(slices.Clone(wrap), c.bin), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	f, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		c.t.Fatal(err)
	}
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() {
		stop(cmd, syscall.SIGKILL)
		if c.t.Failed() {
			b, _ := os.ReadFile(log)
			c.t.Logf("%s:\n%s", filepath.Base(log), tail(b, 40))
		}
	})
	return cmd
}

// tail is the last n lines of b.
func tail(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// stop signals cmd and waits for it to exit.
func stop(cmd *exec.Cmd, sig syscall.Signal) {
	if cmd.ProcessState != nil {
		return
	}
	cmd.Process.Signal(sig)
	cmd.Wait()
}

func (c *cluster) startServer() {
	c.t.Helper()
	c.server = c.start(filepath.Join(filepath.Dir(c.dir), "server.log"), "server", "--data-dir", c.dir, "--listen", c.addr,
		"--tls-cert", c.cert, "--tls-key", c.key, "--store", c.dsn, "--heartbeat-window", c.window.String(), "--backup-interval", "0")
	c.eventually("the server answers", func() error { _, err := c.op.Hosts(context.Background()); return err })
}

// addAgent enrols host name with a join token and starts its agent, with
// capacity and the extra flags; it returns once the host reads up.
func (c *cluster) addAgent(name string, capacity int, flags ...string) *clusterAgent {
	c.t.Helper()
	return c.addWrappedAgent(nil, name, capacity, flags...)
}

// addWrappedAgent is addAgent with the agent run by the command wrap
// (startWrapped).
func (c *cluster) addWrappedAgent(wrap []string, name string, capacity int, flags ...string) *clusterAgent {
	c.t.Helper()
	tok, err := c.op.JoinToken(context.Background(), name, 0)
	if err != nil {
		c.t.Fatal(err)
	}
	a := &clusterAgent{name: name, dir: filepath.Join(filepath.Dir(c.dir), name), wrap: wrap}
	tokenFile := filepath.Join(filepath.Dir(c.dir), name+".token")
	if err := os.WriteFile(tokenFile, []byte(tok.Token+"\n"), 0o600); err != nil {
		c.t.Fatal(err)
	}
	a.args = append([]string{"agent", "--server", "https://" + c.addr, "--server-ca", c.serverCA, "--join-token-file", tokenFile,
		"--host-name", name, "--data-dir", a.dir, "--capacity", strconv.Itoa(capacity), "--heartbeat-interval", "1s", "--pool-size", "0"}, flags...)
	// Its swtpm processes outlive the agent by design; not the test.
	c.t.Cleanup(func() {
		for _, p := range swtpmtest.Processes(a.dir) {
			if pid, err := strconv.Atoi(strings.SplitN(p, ":", 2)[0]); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	c.agents[name] = a
	c.startAgent(a)
	return a
}

func (c *cluster) startAgent(a *clusterAgent) {
	c.t.Helper()
	a.cmd = c.startWrapped(a.dir+".log", a.wrap, a.args...)
	c.waitHost(a.name, "up")
}

// waitHost waits until the server reads host in state.
func (c *cluster) waitHost(name, state string) {
	c.t.Helper()
	c.eventually("host "+name+" reads "+state, func() error {
		h, err := c.op.GetHost(context.Background(), name)
		if err == nil && h.State != state {
			err = fmt.Errorf("it reads %s", h.State)
		}
		return err
	})
}

// eventually retries check for two minutes.
func (c *cluster) eventually(what string, check func() error) {
	c.t.Helper()
	var err error
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if err = check(); err == nil {
			return
		}
	}
	c.t.Fatalf("waiting until %s: %v", what, err)
}

// create asks for a TPM 2.0 vTPM for id, with the flavor's extra specs.
func (c *cluster) create(id string, specs ...string) (api.VTPM, error) {
	fs := map[string]string{"hw:tpm_version": "2.0"}
	for i := 0; i+1 < len(specs); i += 2 {
		fs[specs[i]] = specs[i+1]
	}
	return c.op.Create(context.Background(), api.CreateVTPMRequest{InstanceID: id, Project: "p1", ResolveRequest: api.ResolveRequest{FlavorSpecs: fs}})
}

// vtpmctl runs vtpmctl as the operator, on the server's socket.
func (c *cluster) vtpmctl(args ...string) (code int, stdout, stderr string) {
	c.t.Helper()
	var out, errOut bytes.Buffer
	code = cli.Main(context.Background(), append([]string{"--server", "unix://" + filepath.Join(c.dir, "api.sock")}, args...), &out, &errOut)
	return code, out.String(), errOut.String()
}

// wait waits until id's vTPM is in phase, read from the server alone.
func (c *cluster) wait(id, phase string) api.VTPM {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	v, err := c.op.Wait(ctx, id, func(v api.VTPM) bool { return v.Phase == phase }, nil)
	if err != nil {
		c.t.Fatalf("waiting for %s to be %s: %v (phase %s, reason %q)", id, phase, err, v.Phase, v.Reason)
	}
	return v
}

// hostClient calls the server with a's host certificate, as its agent.
func (c *cluster) hostClient(a *clusterAgent) *client.Client {
	c.t.Helper()
	creds := filepath.Join(a.dir, hostCertDir, hostCredsFile)
	cert, err := tls.LoadX509KeyPair(creds, creds)
	if err != nil {
		c.t.Fatal(err)
	}
	roots, err := client.LoadCAs(c.serverCA)
	if err != nil {
		c.t.Fatal(err)
	}
	return client.New("https://"+c.addr, "").WithTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
}

// swtpmPIDs are the swtpm processes serving a's vTPMs, sorted.
func swtpmPIDs(a *clusterAgent) []string {
	var pids []string
	for _, p := range swtpmtest.Processes(a.dir) {
		pids = append(pids, strings.SplitN(p, ":", 2)[0])
	}
	slices.Sort(pids)
	return pids
}

func clusterID(n int) string { return fmt.Sprintf("c1c1c1c1-0000-4000-8000-%012d", n) }

// TestCluster: one vtpmd server on PostgreSQL and three vtpmd agents (two
// swtpm hosts, one libvirt host in external mode). vTPMs land where
// capacity, traits and drains allow; the libvirt host's guest boots with
// its vTPM measured; everything is read from the server alone. A host
// reads only its own vTPMs and their secrets; a join token works once; a
// revoked host is refused at once.
func TestCluster(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	a := c.addAgent("hv-a", 2)
	b := c.addAgent("hv-b", 2)
	lv := c.addAgent("hv-lv", 1, "--backend", "libvirt", "--libvirt-mode", "external", "--enable-vtpm")
	hosts, err := c.op.Hosts(ctx)
	if err != nil || len(hosts.Items) != 3 {
		t.Fatalf("hosts: %+v %v", hosts, err)
	}
	for _, h := range hosts.Items {
		if h.State != "up" || h.Version == "" || h.Certificates != 1 || len(h.Traits) == 0 {
			t.Errorf("host %+v", h)
		}
	}

	// Capacity: with the libvirt host drained, four vTPMs fill hv-a and
	// hv-b, and a fifth has nowhere to go.
	if _, err := c.op.DrainHost(ctx, lv.name); err != nil {
		t.Fatal(err)
	}
	on := map[string][]string{}
	for n := range 4 {
		v, err := c.create(clusterID(n))
		if err != nil {
			t.Fatal(err)
		}
		on[v.Host] = append(on[v.Host], v.InstanceID)
	}
	if len(on[a.name]) != 2 || len(on[b.name]) != 2 {
		t.Fatalf("placement: %v", on)
	}
	if _, err := c.create(clusterID(4)); client.ErrorCode(err) != api.CodeNoValidHost {
		t.Fatalf("a create beyond every host's capacity: %v, want no_valid_host", err)
	}
	// Traits: no host offers what a Hyper-V vTPM needs.
	_, err = c.op.Create(ctx, api.CreateVTPMRequest{InstanceID: clusterID(5), Project: "p1", ResolveRequest: api.ResolveRequest{
		ImageProps: map[string]string{"hypervisor_type": "hyperv", "hw_machine_type": "hyperv-gen2", "os_vtpm": "required"}}})
	if client.ErrorCode(err) != api.CodeNoValidHost {
		t.Fatalf("a Hyper-V vTPM among libvirt and swtpm hosts: %v, want no_valid_host", err)
	}
	for host, ids := range on {
		agent := c.agents[host]
		for _, id := range ids {
			v := c.wait(id, "active")
			if !strings.HasPrefix(v.Sockets.Data, agent.dir+"/") {
				t.Errorf("%s on %s is served on %s, outside its host's data dir", id, host, v.Sockets.Data)
			}
			checkIdentity(t, c.op, v) // its EK certificates chain to the server's CA
			if !slices.Contains(swtpmPIDs(agent), strconv.Itoa(v.SwtpmPID)) {
				t.Errorf("%s reads swtpm %d, not one of %s's %v", id, v.SwtpmPID, host, swtpmPIDs(agent))
			}
		}
		if n := len(swtpmPIDs(agent)); n != len(ids) {
			t.Errorf("%s runs %d swtpm for %d vTPMs", host, n, len(ids))
		}
	}

	// The libvirt host takes the guest: its vTPM, made by its agent,
	// measures the guest's boot.
	if _, err := c.op.UndrainHost(ctx, lv.name); err != nil {
		t.Fatal(err)
	}
	lvc := connectLibvirt(t)
	gid := "c1c1c1c1-0000-4000-8000-0000000000ff"
	gdir := t.TempDir()
	dom := defineGuest(t, lvc, gid, gdir)
	if v, err := c.create(gid, "hw:tpm_model", "tpm-crb"); err != nil || v.Host != lv.name {
		t.Fatalf("the guest's vTPM: %+v %v", v, err)
	}
	c.wait(gid, "active")
	if _, err := c.op.Attach(ctx, gid, dom.Name); err != nil {
		t.Fatal(err)
	}
	c.eventually("the guest runs with its vTPM", func() error {
		v, err := c.op.Get(ctx, gid)
		if err == nil && (v.Domain != dom.Name || v.Phase != "active") {
			err = fmt.Errorf("domain %q, phase %s", v.Domain, v.Phase)
		}
		return err
	})
	if pcr0 := bootPCRs(t, filepath.Join(gdir, "console.log"))["sha256:0"]; len(pcr0) != 64 || strings.Trim(pcr0, "0") == "" {
		t.Fatalf("the guest's PCR 0 = %q: the firmware measured nothing into its vTPM", pcr0)
	}
	c.eventually("the server reads the guest connected to its vTPM", func() error {
		v, err := c.op.Get(ctx, gid)
		if err == nil && !v.GuestConnected {
			err = errors.New("not connected")
		}
		return err
	})
	if evs, err := c.op.Events(ctx, gid); err != nil || !slices.ContainsFunc(evs.Items, func(e api.Event) bool { return e.Action == "guest connected" }) {
		t.Fatalf("the guest's vTPM's events: %+v %v", evs, err)
	}
	if tpms := guestTPM(t, lvc, dom); len(tpms) != 1 || tpms[0].Backend.External == nil {
		t.Fatalf("the guest's TPM: %+v", tpms)
	}

	// A host reads its own vTPMs only: another's desired state and secret
	// are refused, and the attempt is the vTPM's event.
	ha := c.hostClient(a)
	mine, err := ha.WatchVTPMs(ctx, 0, 0)
	if err != nil || !mine.Reset || len(mine.VTPMs) != 2 {
		t.Fatalf("hv-a's watch: %+v %v", mine, err)
	}
	for _, v := range mine.VTPMs {
		if v.Host != a.name {
			t.Fatalf("hv-a's watch shows %s of %s", v.InstanceID, v.Host)
		}
	}
	theirs := on[b.name][0]
	if _, err := ha.VTPMSecret(ctx, theirs, ""); client.ErrorCode(err) != api.CodeForbidden {
		t.Fatalf("hv-a asking for hv-b's secret: %v, want 403 forbidden", err)
	}
	if _, err := ha.AgentVTPM(ctx, theirs); client.ErrorCode(err) != api.CodeForbidden {
		t.Fatalf("hv-a asking for hv-b's vTPM: %v, want 403 forbidden", err)
	}
	evs, err := c.op.Events(ctx, theirs)
	if err != nil || !slices.ContainsFunc(evs.Items, func(e api.Event) bool { return e.Actor == "host:hv-a" && e.Action == "refused" }) {
		t.Fatalf("hv-b's vTPM's events name no refusal of hv-a: %+v %v", evs, err)
	}

	// Drift: the operator asks, hv-b's agent answers through its watch.
	orphan := filepath.Join(b.dir, "vtpms", "c1c1c1c1-0000-4000-8000-0000000000ee")
	if err := os.MkdirAll(orphan, 0o700); err != nil {
		t.Fatal(err)
	}
	if d, err := c.op.Drift(ctx, b.name, false); err != nil || len(d.Findings) != 1 || d.Findings[0].Object != orphan || d.Findings[0].Deleted {
		t.Fatalf("hv-b's drift: %+v %v", d, err)
	}
	if d, err := c.op.Drift(ctx, b.name, true); err != nil || len(d.Findings) != 1 || !d.Findings[0].Deleted {
		t.Fatalf("hv-b's repair: %+v %v", d, err)
	}
	if _, err := os.Stat(orphan); !os.IsNotExist(err) {
		t.Fatalf("the orphan after the repair: %v", err)
	}

	// A join token works once.
	token, err := os.ReadFile(filepath.Join(filepath.Dir(c.dir), a.name+".token"))
	if err != nil {
		t.Fatal(err)
	}
	roots, _ := client.LoadCAs(c.serverCA)
	anon := client.New("https://"+c.addr, "").WithTLS(&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12})
	if _, err := anon.Enroll(ctx, api.EnrollRequest{JoinToken: strings.TrimSpace(string(token)), CSR: []byte("x")}); err == nil {
		t.Fatal("a join token enrolled twice")
	}

	// Revoked, hv-b is refused at once; its vTPMs stay where they are.
	if _, err := c.op.RevokeHost(ctx, b.name); err != nil {
		t.Fatal(err)
	}
	var ce *client.Error
	if err := c.hostClient(b).Heartbeat(ctx, api.HeartbeatRequest{Version: "x"}); !errors.As(err, &ce) || ce.Status != 401 {
		t.Fatalf("a revoked host's heartbeat: %v, want 401", err)
	}
	c.waitHost(b.name, "down")
	if n := len(swtpmPIDs(b)); n != 2 {
		t.Fatalf("a revoked host's vTPMs: %d swtpm running, want 2", n)
	}
}

// TestClusterFailures: an agent killed while vTPMs are being made on it
// finishes every create when it comes back; an agent gone for longer than
// the heartbeat window leaves its host down and its vTPMs running
// untouched, and takes them back without restarting swtpm; a server gone
// under load leaves the hosts' vTPMs running, and the agents catch up when
// it returns.
func TestClusterFailures(t *testing.T) {
	c := newCluster(t)
	ctx := context.Background()
	a := c.addAgent("hv-a", 20)

	var ids []string
	for n := range 6 {
		v, err := c.create(clusterID(n))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, v.InstanceID)
		if n == 2 {
			stop(a.cmd, syscall.SIGKILL) // mid-way through the creates
		}
	}
	c.startAgent(a)
	for _, id := range ids {
		if v := c.wait(id, "active"); v.Reason != "" {
			t.Errorf("%s: reason %q", id, v.Reason)
		}
	}
	pids := swtpmPIDs(a)
	if len(pids) != len(ids) {
		t.Fatalf("%d swtpm for %d vTPMs after the agent's crash: %v", len(pids), len(ids), pids)
	}

	// The agent stops for longer than the heartbeat window.
	stop(a.cmd, syscall.SIGTERM)
	c.waitHost(a.name, "down")
	if got := swtpmPIDs(a); !slices.Equal(got, pids) {
		t.Fatalf("with the agent gone, swtpm %v, were %v", got, pids)
	}
	for _, id := range ids {
		if v, err := c.op.Get(ctx, id); err != nil || v.Phase != "active" {
			t.Fatalf("%s while its host is down: %+v %v", id, v, err)
		}
	}
	if _, err := c.create(clusterID(10)); client.ErrorCode(err) != api.CodeNoValidHost {
		t.Fatalf("a create with the only host down: %v, want no_valid_host", err)
	}
	c.startAgent(a)
	for _, id := range ids {
		c.wait(id, "active")
	}
	if got := swtpmPIDs(a); !slices.Equal(got, pids) {
		t.Fatalf("the agent's return restarted swtpm: %v, were %v", got, pids)
	}

	// The server goes away under load: creates just asked for, which the
	// agent is making and reporting. The vTPMs keep running, and the
	// agent catches up when it is back: every create finishes.
	var busy []string
	for n := 20; n < 23; n++ {
		v, err := c.create(clusterID(n))
		if err != nil {
			t.Fatal(err)
		}
		busy = append(busy, v.InstanceID)
	}
	stop(c.server, syscall.SIGTERM)
	time.Sleep(2 * time.Second) // the agent's reports, watch and heartbeats fail meanwhile
	if got := swtpmPIDs(a); !slices.Equal(slices.DeleteFunc(got, func(p string) bool { return !slices.Contains(pids, p) }), pids) {
		t.Fatalf("with the server gone, swtpm %v, were %v", swtpmPIDs(a), pids)
	}
	c.startServer()
	c.waitHost(a.name, "up")
	for _, id := range busy {
		c.wait(id, "active")
	}
	v, err := c.create(clusterID(11))
	if err != nil {
		t.Fatal(err)
	}
	c.wait(v.InstanceID, "active")
	if _, err := c.op.Delete(ctx, ids[0]); err != nil {
		t.Fatal(err)
	}
	c.eventually("the deleted vTPM is gone", func() error {
		if _, err := c.op.Get(ctx, ids[0]); !client.IsNotFound(err) {
			return fmt.Errorf("still there (%v)", err)
		}
		return nil
	})
	ids = append(ids, busy...)
	if n := len(swtpmPIDs(a)); n != len(ids) {
		t.Fatalf("after one delete and one create: %d swtpm, want %d", n, len(ids))
	}

	// An agent that starts while the server is away registers, and takes
	// its vTPMs back, once the server is there.
	pids = swtpmPIDs(a)
	stop(c.server, syscall.SIGTERM)
	stop(a.cmd, syscall.SIGTERM)
	a.cmd = c.start(a.dir+".log", a.args...)
	time.Sleep(time.Second) // it starts, and fails to reach the server
	c.startServer()
	c.waitHost(a.name, "up")
	v, err = c.create(clusterID(12))
	if err != nil {
		t.Fatal(err)
	}
	c.wait(v.InstanceID, "active")
	if got := swtpmPIDs(a); len(got) != len(pids)+1 || !slices.Equal(slices.DeleteFunc(got, func(p string) bool { return !slices.Contains(pids, p) }), pids) {
		t.Fatalf("after the agent started without its server: swtpm %v, were %v and one new", swtpmPIDs(a), pids)
	}
}
