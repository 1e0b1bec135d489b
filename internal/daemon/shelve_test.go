package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cli"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// sameEKs fails the test unless after has the endorsement keys and
// certificates of before.
func sameEKs(t *testing.T, before, after api.Identity) {
	t.Helper()
	if len(after.EKs) != len(before.EKs) || len(before.EKs) == 0 {
		t.Fatalf("EKs: %d after, %d before", len(after.EKs), len(before.EKs))
	}
	for i := range before.EKs {
		if after.EKs[i].PublicKeyPEM != before.EKs[i].PublicKeyPEM || after.EKs[i].CertificatePEM != before.EKs[i].CertificatePEM {
			t.Fatalf("EK %d changed", i)
		}
	}
}

// eventWith says whether id's events hold one of action whose detail
// contains all of words.
func eventWith(t *testing.T, c *cluster, id, action string, words ...string) bool {
	t.Helper()
	evs, err := c.op.Events(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range evs.Items {
		ok := e.Action == action
		for _, w := range words {
			ok = ok && strings.Contains(e.Detail, w)
		}
		if ok {
			return true
		}
	}
	return false
}

// TestClusterShelve shelves a vTPM on one agent (its own vtpmd process,
// over mTLS) and unshelves it on another: an NV index and an NV counter
// written through its socket with tpm2-tools before read back the same
// after, with the same endorsement keys. While shelved it is on no host,
// its state gone from the first; start, a second shelve and an unshelve
// of one not shelved are refused with their codes; a running vTPM is
// not shelved.
func TestClusterShelve(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	c := newCluster(t)
	ctx := context.Background()
	a := c.addAgent("hv-a", 2)
	c.addAgent("hv-b", 2)
	id := clusterID(60)
	if _, err := c.create(id); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	if v.Host != "hv-a" {
		// Placement chooses among equals by name.
		t.Fatalf("placed on %s", v.Host)
	}
	ident, err := c.op.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("S"), 32)
	writeNV(t, v.Sockets.Data, data, true)
	increment(t, v.Sockets.Data)
	increment(t, v.Sockets.Data)
	counter := readCounter(t, v.Sockets.Data)

	_, err = c.op.Shelve(ctx, id)
	wantCode(t, err, api.CodeVTPMNotStopped)
	_, err = c.op.Unshelve(ctx, id, "")
	wantCode(t, err, api.CodeVTPMNotShelved)
	if _, err := c.op.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "stopped")
	var s api.VTPM // through vtpmctl, as an operator shelves
	if code, out, errOut := c.vtpmctl("-o", "json", "shelve", id); code != cli.ExitOK || json.Unmarshal([]byte(out), &s) != nil {
		t.Fatalf("vtpmctl shelve: exit %d\n%s%s", code, out, errOut)
	}
	if s.Phase != "shelved" || s.Host != "" {
		t.Fatalf("shelved: phase %s on host %q", s.Phase, s.Host)
	}
	if hasState(t, a.dir, id) {
		t.Fatal("the state stayed on the host it was shelved from")
	}
	_, err = c.op.Shelve(ctx, id)
	wantCode(t, err, api.CodeVTPMShelved)
	_, err = c.op.Start(ctx, id)
	wantCode(t, err, api.CodeVTPMShelved)
	_, err = c.op.Migrate(ctx, id, api.MigrateRequest{Host: "hv-b"})
	wantCode(t, err, api.CodeVTPMShelved)
	_, err = c.op.Resize(ctx, id, api.ResizeRequest{ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}})
	wantCode(t, err, api.CodeVTPMShelved)
	if !eventWith(t, c, id, "shelved", "secret is kept") {
		t.Fatal("no shelved event")
	}

	if code, out, errOut := c.vtpmctl("unshelve", id, "--to", "hv-z"); code != cli.ExitNotFound || !strings.Contains(errOut, string(api.CodeNotFound)) {
		t.Fatalf("vtpmctl unshelve --to a host that does not exist: exit %d\n%s%s", code, out, errOut)
	}
	var u api.VTPM
	if code, out, errOut := c.vtpmctl("-o", "json", "unshelve", id, "--to", "hv-b"); code != cli.ExitOK || json.Unmarshal([]byte(out), &u) != nil {
		t.Fatalf("vtpmctl unshelve --to hv-b: exit %d\n%s%s", code, out, errOut)
	}
	if u.Phase != "stopped" || u.Host != "hv-b" {
		t.Fatalf("unshelved: phase %s on host %q", u.Phase, u.Host)
	}
	if _, err := c.op.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	v = c.wait(id, "active")
	if v.Host != "hv-b" {
		t.Fatalf("active on %s", v.Host)
	}
	if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, data) {
		t.Fatalf("NV after unshelve = %q, want %q", got, data)
	}
	if got := readCounter(t, v.Sockets.Data); !bytes.Equal(got, counter) {
		t.Fatalf("NV counter after unshelve = %x, want %x", got, counter)
	}
	after, err := c.op.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	sameEKs(t, ident, after)
	checkIdentity(t, c.op, v) // the TPM holds the EKs on record
	_, err = c.op.Unshelve(ctx, id, "")
	wantCode(t, err, api.CodeVTPMNotShelved)

	// A shelved vTPM is deleted at once, with its bundle.
	if _, err := c.op.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "stopped")
	if _, err := c.op.Shelve(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := c.op.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := c.op.Get(ctx, id); client.ErrorCode(err) != api.CodeNotFound {
		t.Fatalf("a deleted shelved vTPM: %v", err)
	}
}

// TestClusterEvacuate backs up the vTPMs of one agent, changes them, kills
// the agent and its swtpm processes for good, and evacuates its host once
// it reads down: each vTPM with a backup is active on the other host with
// its NV data as of the backup and its EK, its events naming what is lost;
// the one without a backup is refused, then given a new TPM with
// --new-tpm (a new EK). A host that is up is not evacuated without
// --force.
func TestClusterEvacuate(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	c := newCluster(t)
	ctx := context.Background()
	a := c.addAgent("hv-a", 4)
	ids := []string{clusterID(70), clusterID(71), clusterID(72)}
	bare := ids[2] // never backed up
	idents := map[string]api.Identity{}
	backedUp := bytes.Repeat([]byte("E"), 32)
	counters := map[string][]byte{}
	for _, id := range ids {
		if _, err := c.create(id); err != nil {
			t.Fatal(err)
		}
		v := c.wait(id, "active")
		ident, err := c.op.Identity(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		idents[id] = ident
		writeNV(t, v.Sockets.Data, backedUp, true)
		increment(t, v.Sockets.Data)
		counters[id] = readCounter(t, v.Sockets.Data)
		if id == bare {
			continue
		}
		if _, err := c.op.CreateBackup(ctx, id); err != nil {
			t.Fatal(err)
		}
		writeNV(t, v.Sockets.Data, bytes.Repeat([]byte("L"), 32), false) // lost with the host
		increment(t, v.Sockets.Data)
	}
	b := c.addAgent("hv-b", 4)

	_, err := c.op.Evacuate(ctx, "hv-a", api.EvacuateRequest{}, nil)
	wantCode(t, err, api.CodeHostNotDown)

	// hv-a is gone for good: its agent and its swtpm processes.
	stop(a.cmd, syscall.SIGKILL)
	for _, p := range swtpmtest.Processes(a.dir) {
		if pid, err := strconv.Atoi(strings.SplitN(p, ":", 2)[0]); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	c.waitHost("hv-a", "down")

	var out, errOut bytes.Buffer
	if code := cli.Main(ctx, []string{"--server", "unix://" + filepath.Join(c.dir, "api.sock"), "host", "evacuate", "hv-a"}, &out, &errOut); code != 0 {
		t.Fatalf("vtpmctl host evacuate: %d\n%s%s", code, out.String(), errOut.String())
	}
	t.Logf("vtpmctl host evacuate hv-a:\n%s", out.String())
	if !strings.Contains(out.String(), "2 restored") || !strings.Contains(out.String(), "1 refused") ||
		!strings.Contains(out.String(), bare+": refused (backup_not_found)") {
		t.Fatalf("evacuation output:\n%s", out.String())
	}
	for _, id := range ids[:2] {
		v := c.wait(id, "active")
		if v.Host != "hv-b" {
			t.Fatalf("%s active on %s", id, v.Host)
		}
		if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, backedUp) {
			t.Fatalf("%s: NV after evacuation = %q, want %q (as of the backup)", id, got, backedUp)
		}
		if got := readCounter(t, v.Sockets.Data); !bytes.Equal(got, counters[id]) {
			t.Fatalf("%s: NV counter after evacuation = %x, want %x", id, got, counters[id])
		}
		after, err := c.op.Identity(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		sameEKs(t, idents[id], after)
		if !eventWith(t, c, id, "unshelved", "evacuated from host hv-a", "is lost") {
			t.Fatalf("%s: no event naming what is lost", id)
		}
	}
	if v, err := c.op.Get(ctx, bare); err != nil || v.Host != "hv-a" {
		t.Fatalf("the refused vTPM moved: %+v, %v", v, err)
	}

	// Again, with --new-tpm: the one left gets a new TPM on hv-b.
	e, err := c.op.Evacuate(ctx, "hv-a", api.EvacuateRequest{NewTPM: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if e.Count[api.EvacuatedNewTPM] != 1 || len(e.Items) != 1 || e.Items[0].InstanceID != bare {
		t.Fatalf("second evacuation: %+v", e)
	}
	v := c.wait(bare, "active")
	if v.Host != b.name {
		t.Fatalf("new TPM on %s", v.Host)
	}
	fresh, err := c.op.Identity(ctx, bare)
	if err != nil {
		t.Fatal(err)
	}
	if fresh.EKs[0].PublicKeyPEM == idents[bare].EKs[0].PublicKeyPEM {
		t.Fatal("the new TPM has the lost one's EK")
	}
	if !eventWith(t, c, bare, "evacuated with a new TPM", "new EK") {
		t.Fatal("no event saying the TPM is new")
	}
	// Nothing is left to do.
	if e, err := c.op.Evacuate(ctx, "hv-a", api.EvacuateRequest{}, nil); err != nil || len(e.Items) != 0 {
		t.Fatalf("third evacuation: %+v, %v", e, err)
	}
}

// TestClusterShelveContinues interrupts a shelve and an unshelve (their
// requests given up while the host's agent is stopped) and runs them
// again: each continues from the step it reached, and the vTPM's NV data
// is intact at the end, on the host it was unshelved to.
func TestClusterShelveContinues(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	c := newCluster(t)
	ctx := context.Background()
	a := c.addAgent("hv-a", 2)
	b := c.addAgent("hv-b", 2)
	id := clusterID(80)
	if _, err := c.create(id); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	data := bytes.Repeat([]byte("R"), 32)
	writeNV(t, v.Sockets.Data, data, true)
	if _, err := c.op.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "stopped")

	// The agent is gone before the host reads down: the shelve starts,
	// and is given up waiting for the export.
	stop(a.cmd, syscall.SIGKILL)
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	_, err := c.op.Shelve(short, id)
	cancel()
	if err == nil {
		t.Fatal("a shelve finished without its host's agent")
	}
	if got, _ := c.op.Get(ctx, id); got.Phase != "shelving" || got.Host != "hv-a" {
		t.Fatalf("after the interrupted shelve: %s on %q", got.Phase, got.Host)
	}
	_, err = c.op.Start(ctx, id)
	wantCode(t, err, api.CodeVTPMShelved)
	c.startAgent(a) // it leaves the shelving vTPM alone
	if s, err := c.op.Shelve(ctx, id); err != nil || s.Phase != "shelved" {
		t.Fatalf("shelve again: %+v, %v", s, err)
	}

	stop(b.cmd, syscall.SIGKILL)
	short, cancel = context.WithTimeout(ctx, 2*time.Second)
	_, err = c.op.Unshelve(short, id, "hv-b")
	cancel()
	if err == nil {
		t.Fatal("an unshelve finished without its host's agent")
	}
	if got, _ := c.op.Get(ctx, id); got.Phase != "unshelving" || got.Host != "hv-b" {
		t.Fatalf("after the interrupted unshelve: %s on %q", got.Phase, got.Host)
	}
	c.startAgent(b)
	if u, err := c.op.Unshelve(ctx, id, ""); err != nil || u.Phase != "stopped" || u.Host != "hv-b" {
		t.Fatalf("unshelve again: %+v, %v", u, err)
	}
	if _, err := c.op.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	v = c.wait(id, "active")
	if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, data) {
		t.Fatalf("NV after the continued moves = %q, want %q", got, data)
	}
}
