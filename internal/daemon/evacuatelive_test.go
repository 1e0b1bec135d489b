package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cli"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// TestClusterEvacuateLive empties an swtpm host that is up with vtpmctl
// host evacuate-live: the host is drained first (an event naming the
// operator); its stopped vTPMs move cold, one at a time, to the other
// host, stopped there, with the NV index written before and their EKs; its
// running vTPM is refused with not_supported (the swtpm backend cannot
// migrate a running guest) and runs on where it was. Evacuating again
// finds that one alone. The refusals change nothing: not the operator,
// no such host, the host itself as target, no such target, too many at a
// time.
func TestClusterEvacuateLive(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	c := newCluster(t)
	ctx := context.Background()
	c.addAgent("hv-a", 4)
	ids := []string{clusterID(90), clusterID(91), clusterID(92)}
	running := ids[2]
	data := map[string][]byte{}
	idents := map[string]api.Identity{}
	for i, id := range ids {
		if _, err := c.create(id); err != nil {
			t.Fatal(err)
		}
		v := c.wait(id, "active")
		data[id] = bytes.Repeat([]byte{byte('A' + i)}, 32)
		writeNV(t, v.Sockets.Data, data[id], true)
		ident, err := c.op.Identity(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		idents[id] = ident
		if id != running {
			if _, err := c.op.Stop(ctx, id); err != nil {
				t.Fatal(err)
			}
			c.wait(id, "stopped")
		}
	}
	c.addAgent("hv-b", 4)

	_, err := client.New("unix://"+filepath.Join(c.dir, "api.sock"), "p1").EvacuateLive(ctx, "hv-a", api.EvacuateLiveRequest{}, nil)
	wantCode(t, err, api.CodeForbidden)
	_, err = c.op.EvacuateLive(ctx, "hv-z", api.EvacuateLiveRequest{}, nil)
	wantCode(t, err, api.CodeNotFound)
	_, err = c.op.EvacuateLive(ctx, "hv-a", api.EvacuateLiveRequest{Target: "hv-a"}, nil)
	wantCode(t, err, api.CodeTargetIsSource)
	_, err = c.op.EvacuateLive(ctx, "hv-a", api.EvacuateLiveRequest{Target: "hv-z"}, nil)
	wantCode(t, err, api.CodeNotFound)
	_, err = c.op.EvacuateLive(ctx, "hv-a", api.EvacuateLiveRequest{MaxConcurrent: 9}, nil)
	wantCode(t, err, api.CodeInvalidParameter)
	if h, err := c.op.GetHost(ctx, "hv-a"); err != nil || h.Draining {
		t.Fatalf("after the refusals hv-a is %+v, %v; want it not draining", h, err)
	}

	var out, errOut bytes.Buffer
	if code := cli.Main(ctx, []string{"--server", "unix://" + filepath.Join(c.dir, "api.sock"), "host", "evacuate-live", "hv-a"}, &out, &errOut); code != 0 {
		t.Fatalf("vtpmctl host evacuate-live: %d\n%s%s", code, out.String(), errOut.String())
	}
	t.Logf("vtpmctl host evacuate-live hv-a:\n%s", out.String())
	for _, want := range []string{"evacuating host hv-a live: 3 vTPMs", "[3/3] ", ids[0] + ": migrated cold to hv-b, with its state",
		ids[1] + ": migrated cold to hv-b, with its state", running + ": refused (not_supported): Host hv-a runs the swtpm backend",
		"host hv-a: 0 live-migrated, 2 cold-migrated, 1 refused"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("no %q in the output", want)
		}
	}
	if h, err := c.op.GetHost(ctx, "hv-a"); err != nil || !h.Draining || h.State != "draining" {
		t.Fatalf("hv-a after the evacuation: %+v, %v; want draining", h, err)
	}
	// The host's events: drained by the operator, then evacuated.
	st, err := store.OpenPostgres(ctx, c.dsn, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var hostEvents []store.Event
	if err := st.View(ctx, func(tx *store.Tx) (err error) { hostEvents, err = tx.ListAllEvents(store.HostKey("hv-a")); return err }); err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, e := range hostEvents {
		actions = append(actions, e.Action)
	}
	drained := slices.Index(actions, "drained")
	if drained < 0 || drained > slices.Index(actions, "evacuating live") || !slices.Contains(actions, "evacuated live") {
		t.Fatalf("hv-a's events %q; want drained, evacuating live, evacuated live", actions)
	}

	// Each stopped one is stopped on hv-b, its state there alone, the same
	// TPM. They moved one at a time: the second began after the first
	// finished.
	var finished, began time.Time
	for i, id := range ids[:2] {
		v, err := c.op.Get(ctx, id)
		if err != nil || v.Host != "hv-b" || v.Desired != "stopped" {
			t.Fatalf("%s after the evacuation: %+v, %v; want stopped on hv-b", id, v, err)
		}
		c.wait(id, "stopped")
		c.onlyOn(id, "hv-b")
		evs, err := c.op.Events(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range evs.Items {
			switch {
			case e.Action == "migration started" && i == 1:
				began = e.At
			case e.Action == "migrated" && i == 0:
				finished = e.At
			case e.Action == "migration started" && e.Actor != hostEvents[drained].Actor:
				t.Fatalf("%s: its migration by %q, the drain by %q", id, e.Actor, hostEvents[drained].Actor)
			}
		}
		if _, err := c.op.Start(ctx, id); err != nil {
			t.Fatal(err)
		}
		v = c.wait(id, "active")
		if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, data[id]) {
			t.Fatalf("%s: NV on hv-b = %q, want %q", id, got, data[id])
		}
		after, err := c.op.Identity(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		sameEKs(t, idents[id], after)
		checkIdentity(t, c.op, v)
	}
	if finished.IsZero() || began.Before(finished) {
		t.Fatalf("the first migration finished at %s, the second began at %s: not one at a time", finished, began)
	}
	// The running one runs on where it was.
	v := c.wait(running, "active")
	if v.Host != "hv-a" {
		t.Fatalf("the refused vTPM is on %s", v.Host)
	}
	if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, data[running]) {
		t.Fatalf("the refused vTPM's NV = %q, want %q", got, data[running])
	}
	c.onlyOn(running, "hv-a")

	// Again, as JSON: the refused one is all there is left.
	out.Reset()
	errOut.Reset()
	if code := cli.Main(ctx, []string{"--server", "unix://" + filepath.Join(c.dir, "api.sock"), "-o", "json", "host", "evacuate-live", "hv-a",
		"--to", "hv-b"}, &out, &errOut); code != 0 {
		t.Fatalf("vtpmctl -o json host evacuate-live: %d\n%s%s", code, out.String(), errOut.String())
	}
	var again api.Evacuation
	if err := json.Unmarshal(out.Bytes(), &again); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if again.Host != "hv-a" || len(again.Items) != 1 || again.Items[0].InstanceID != running || again.Items[0].Code != api.CodeNotSupported ||
		again.Count[api.EvacuatedRefused] != 1 {
		t.Fatalf("evacuating again: %+v", again)
	}
	if !strings.Contains(errOut.String(), "evacuating host hv-a live: 1 vTPMs") || !strings.Contains(errOut.String(), "[1/1] "+running+": refused (not_supported)") {
		t.Fatalf("progress on stderr: %q", errOut.String())
	}
}
