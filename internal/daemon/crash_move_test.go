package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// nvAfter starts the stopped vTPM id, reads its NV index, and stops it
// again.
func nvAfter(t *testing.T, c *cluster, id string) []byte {
	t.Helper()
	if _, err := c.op.Start(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	got := readNVData(t, v.Sockets.Data)
	if _, err := c.op.Stop(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "stopped")
	return got
}

// TestCrashMidRestore kills, with SIGKILL, the server or the host's agent
// at moments spread over a restore of a backup (as it is asked, at delays
// after, the agent's once it has staged the backup to prove it, once the
// restore is done).
// After each kill the vTPM is usable, whole, as it was before or as the
// backup (never a mix of the two, never neither), and once the killed
// process is back the same restore finishes: the vTPM holds the backup's
// NV data.
func TestCrashMidRestore(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	c := newCluster(t)
	ctx := context.Background()
	a := c.addAgent("hv-a", 2)
	id := clusterID(110)
	if _, err := c.create(id); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	backedUp := bytes.Repeat([]byte("B"), 32)
	writeNV(t, v.Sockets.Data, backedUp, true)
	if _, err := c.op.CreateBackup(ctx, id); err != nil {
		t.Fatal(err)
	}

	kept := map[string]int{} // what the vTPM held after a kill
	stagedSeen := 0
	ms := time.Millisecond
	// Kill points: delays after "restoring"; the agent's staging directory
	// beside the state's there (swtpmhost.Import: staged, being proven),
	// three times, as it may come and go between two looks; "restored".
	const staged, restored = -1, -2
	delays := []time.Duration{0, 10 * ms, 30 * ms, 60 * ms, 100 * ms, 150 * ms, staged, staged, staged, restored}
	n := 0
	for _, victim := range []string{"server", "agent"} {
		for _, delay := range delays {
			if delay == staged && victim == "server" {
				continue // the server stages nothing
			}
			n++
			v := c.wait(id, "active")
			later := bytes.Repeat([]byte{byte('a' + n)}, 32)
			writeNV(t, v.Sockets.Data, later, false)
			if _, err := c.op.Stop(ctx, id); err != nil {
				t.Fatal(err)
			}
			c.wait(id, "stopped")
			proc := &c.server
			if victim == "agent" {
				proc = &a.cmd
			}
			before, _ := c.op.Events(ctx, id)
			rctx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() { _, err := c.op.RestoreBackup(rctx, id, api.RestoreRequest{}); done <- err }()
			fresh := func(action string) bool {
				evs, err := c.op.Events(ctx, id)
				return err == nil && slices.ContainsFunc(evs.Items[len(before.Items):], func(e api.Event) bool { return e.Action == action })
			}
			if delay == staged {
				// Watched from the request on: the import is quicker than
				// a look at the events.
				stagedAt := filepath.Join(a.dir, "vtpms", ".import-"+id)
			watch:
				for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); {
					if _, err := os.Stat(stagedAt); err == nil {
						stagedSeen++
						break
					}
					select {
					case err := <-done:
						done <- err
						break watch
					default:
					}
				}
			}
			c.eventually("the restore is asked", func() error {
				if !fresh("restoring") {
					return errors.New("no restoring event")
				}
				return nil
			})
			switch delay {
			case restored:
				c.eventually("the restore is done", func() error {
					if !fresh("restored") {
						return errors.New("no restored event")
					}
					return nil
				})
			case staged:
			default:
				time.Sleep(delay)
			}
			stop(*proc, syscall.SIGKILL)
			cancel()
			<-done
			when := map[time.Duration]string{staged: "with the import staged", restored: "once the restore was done"}[delay]
			if when == "" {
				when = fmt.Sprint(delay, " after the restore was asked")
			}
			if victim == "server" {
				c.startServer()
			} else {
				c.startAgent(a)
			}
			c.wait(id, "stopped")
			// One usable copy, whole: the one before, or the backup.
			got := nvAfter(t, c, id)
			if !bytes.Equal(got, later) && !bytes.Equal(got, backedUp) {
				t.Fatalf("%s killed %s: NV %q, neither the state's %q nor the backup's %q", victim, when, got, later, backedUp)
			}
			held := map[bool]string{true: "backup", false: "state before"}[bytes.Equal(got, backedUp)]
			if delay == restored && held != "backup" {
				t.Fatalf("%s killed once the restore was done: the vTPM holds the state before it", victim)
			}
			kept[victim+": "+held]++
			t.Logf("%s killed %s: the vTPM holds the %s", victim, when, held)
			if _, err := c.op.RestoreBackup(ctx, id, api.RestoreRequest{}); err != nil {
				t.Fatalf("%s killed %s: restoring again: %v", victim, when, err)
			}
			if got := nvAfter(t, c, id); !bytes.Equal(got, backedUp) {
				t.Fatalf("%s killed %s: NV after restoring again %q, want %q", victim, when, got, backedUp)
			}
			if _, err := c.op.Start(ctx, id); err != nil {
				t.Fatal(err)
			}
		}
	}
	checkIdentity(t, c.op, c.wait(id, "active"))
	if stagedSeen == 0 {
		t.Errorf("the agent's staging directory was never seen: no kill landed mid-import (%v)", kept)
	}
	t.Logf("kills: %v; %d of the agent's while its import was staged", kept, stagedSeen)
}

// TestCrashMidEvacuate kills, with SIGKILL, the server or the destination
// host's agent as an evacuation restoring a vTPM from its backup reaches
// each of its steps: the vTPM taken off the gone host (its backup now its
// shelved bundle), placed on the destination (unshelving), while the
// destination takes it in, and once it is there. After each kill there is
// one usable copy: the record names the destination and the destination
// holds the state, or the servers hold the bundle (or, killed before the
// first step, the backup); evacuating again finishes the move, and the
// vTPM runs on the destination with the NV data of its backup. The hosts
// take turns being the one gone (its agent and swtpm processes killed,
// evacuated with --force, and back afterwards with a stale copy that the
// next restore onto it replaces).
func TestCrashMidEvacuate(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	c := newCluster(t)
	ctx := context.Background()
	st, err := store.OpenPostgres(ctx, c.dsn, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	hosts := []*clusterAgent{c.addAgent("hv-a", 2)}
	id := clusterID(111)
	if _, err := c.create(id); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	writeNV(t, v.Sockets.Data, bytes.Repeat([]byte("0"), 32), true)
	ident, err := c.op.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	hosts = append(hosts, c.addAgent("hv-b", 2))

	type step struct {
		name  string
		delay time.Duration
		at    func(v *store.VTPM, gone, dest string) bool
	}
	steps := []step{
		{"off its host", 0, func(v *store.VTPM, _, _ string) bool { return v.Phase == store.PhaseShelved }},
		{"placed", 0, func(v *store.VTPM, _, dest string) bool { return v.Phase == store.PhaseUnshelving && v.Host == dest }},
		{"taking it in", 40 * time.Millisecond, func(v *store.VTPM, _, dest string) bool { return v.Phase == store.PhaseUnshelving && v.Host == dest }},
		{"there", 0, func(v *store.VTPM, _, dest string) bool { return v.Host == dest && v.Phase != store.PhaseUnshelving }},
	}
	round, hits := 0, map[string]int{}
	for _, victim := range []string{"server", "destination"} {
		for _, s := range steps {
			round++
			gone, dest := hosts[(round+1)%2], hosts[round%2]
			v := c.wait(id, "active")
			if v.Host != gone.name {
				t.Fatalf("round %d: the vTPM is on %s, want %s", round, v.Host, gone.name)
			}
			backedUp := bytes.Repeat([]byte{byte('0' + round)}, 32)
			writeNV(t, v.Sockets.Data, backedUp, false)
			if _, err := c.op.CreateBackup(ctx, id); err != nil {
				t.Fatal(err)
			}
			writeNV(t, v.Sockets.Data, bytes.Repeat([]byte("L"), 32), false) // lost with the host
			killHost(gone)

			proc := &c.server
			if victim == "destination" {
				proc = &dest.cmd
			}
			ectx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() {
				_, err := c.op.Evacuate(ectx, gone.name, api.EvacuateRequest{Force: true}, nil)
				done <- err
			}()
			killedAt := "done"
		watch:
			for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); {
				if s.at(vtpmRecordIn(t, st, id), gone.name, dest.name) {
					killedAt = s.name
					break
				}
				select {
				case err := <-done:
					if err != nil {
						t.Fatalf("evacuating before the kill: %v", err)
					}
					done <- nil
					break watch
				default:
				}
			}
			time.Sleep(s.delay)
			stop(*proc, syscall.SIGKILL)
			cancel()
			<-done
			hits[victim+" at "+killedAt]++

			// One usable copy.
			rec := vtpmRecordIn(t, st, id)
			shelvedErr := st.View(ctx, func(tx *store.Tx) error { _, err := tx.GetShelved(id, rec.Incarnation); return err })
			switch {
			case rec.Phase == store.PhaseShelved || rec.Phase == store.PhaseUnshelving:
				if shelvedErr != nil {
					t.Fatalf("round %d, %s killed at %q: %s with no shelved bundle: %v", round, victim, killedAt, rec.Phase, shelvedErr)
				}
			case rec.Host == dest.name:
				if !hasState(t, dest.dir, id) || shelvedErr == nil {
					t.Fatalf("round %d, %s killed at %q: on %s, whose state is there: %v; a shelved bundle left: %v",
						round, victim, killedAt, dest.name, hasState(t, dest.dir, id), shelvedErr == nil)
				}
			case rec.Host == gone.name:
				// Not begun: its backup is the copy.
			default:
				t.Fatalf("round %d, %s killed at %q: the record names %q, phase %s", round, victim, killedAt, rec.Host, rec.Phase)
			}
			if victim == "server" {
				c.startServer()
			} else {
				c.startAgent(dest)
			}
			e, err := c.op.Evacuate(ctx, gone.name, api.EvacuateRequest{Force: true}, nil)
			if err != nil {
				t.Fatalf("round %d, %s killed at %q: evacuating again: %v", round, victim, killedAt, err)
			}
			if e.Count[api.EvacuatedRefused] != 0 {
				t.Fatalf("round %d, %s killed at %q: evacuating again: %+v", round, victim, killedAt, e.Items)
			}
			v = c.wait(id, "active")
			if v.Host != dest.name {
				t.Fatalf("round %d, %s killed at %q: active on %s, want %s", round, victim, killedAt, v.Host, dest.name)
			}
			if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, backedUp) {
				t.Fatalf("round %d, %s killed at %q: NV %q, want the backup's %q", round, victim, killedAt, got, backedUp)
			}
			after, err := c.op.Identity(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			sameEKs(t, ident, after)
			t.Logf("round %d: %s killed at %q; the evacuation finished when run again", round, victim, killedAt)
			c.startAgent(gone) // back, with a stale copy
		}
	}
	killedMidway(t, hits)
	checkIdentity(t, c.op, c.wait(id, "active"))
}
