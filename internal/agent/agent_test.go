package agent_test

import (
	"context"
	"crypto"
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
	"github.com/vtpmd/vtpmd/internal/backend/direct"
	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// host is one agent with the swtpm backend, a SQLite store and an embedded
// key manager, driven pass by pass.
type host struct {
	a  *agent.Agent
	st *store.Store
	rt *swtpmhost.Runtime
	kr keyring.Keyring
}

type certifier struct{ ca *swtpmtest.CA }

func (c certifier) CertifyEK(ctx context.Context, _ string, _ spec.Version, kind swtpm.EKKind, pub crypto.PublicKey) ([]byte, error) {
	return c.ca.Certify(ctx, kind, pub)
}

func newHost(t *testing.T, root string) *host { return newPooledHost(t, root, 0) }

// newPooledHost is newHost whose runtime keeps pool manufactured TPMs
// ready.
func newPooledHost(t *testing.T, root string, pool int) *host {
	t.Helper()
	swtpmtest.Require(t)
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "vtpmd.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	kr, err := embedded.Open(ctx, st, filepath.Join(t.TempDir(), "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	rt, err := swtpmhost.New(swtpmhost.Config{Root: root, Certifier: certifier{swtpmtest.NewCA(t)}, PoolSize: pool})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		rt.Close(context.Background())
		swtpmtest.CheckNoProcesses(t, root)
	})
	a := &agent.Agent{Host: "h1", Capacity: 10, Records: agentstore.New(st, kr, nil, nil), Backend: direct.New(rt)}
	h := &host{a: a, st: st, rt: rt, kr: kr}
	if err := h.a.Register(ctx); err != nil {
		t.Fatal(err)
	}
	return h
}

// create records a vTPM as the API does.
func (h *host) create(t *testing.T, id string, v spec.Version) {
	t.Helper()
	ctx := context.Background()
	payload, err := keyring.NewVTPMSecret()
	if err != nil {
		t.Fatal(err)
	}
	rec := &store.VTPM{InstanceID: id, Project: "p1", Spec: spec.Spec{Version: v, Model: spec.TIS}, Host: "h1",
		Desired: store.DesiredRunning, Phase: store.PhasePending}
	_, err = keyring.CreateRecorded(ctx, h.kr, "p1", keyring.VTPMSecretName(id), payload, func(sid string) error {
		rec.SecretID = sid
		return h.st.Update(ctx, func(tx *store.Tx) error { return tx.CreateVTPM(rec) })
	})
	if err != nil {
		t.Fatal(err)
	}
}

// pass runs one reconciliation pass and returns the record after it.
func (h *host) pass(t *testing.T, id string) *store.VTPM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := h.a.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	var v *store.VTPM
	if err := h.st.View(ctx, func(tx *store.Tx) (err error) { v, err = tx.GetVTPM(id); return err }); err != nil {
		t.Fatal(err)
	}
	return v
}

// send sends one raw command to the TPM on sock and returns the response
// code.
func send(t *testing.T, sock string, cmd []byte) uint32 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tpm, err := swtpm.Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	rsp, err := tpm.Send(cmd)
	if err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint32(rsp[6:10])
}

// waitReleased waits until swtpm has closed its end of a connection a
// client closed on sock.
func waitReleased(t *testing.T, sock string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		held, err := swtpm.Connected(sock)
		if err != nil {
			t.Fatal(err)
		}
		if !held {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm still holds a connection on %s", sock)
		}
	}
}

// The response codes of a TPM in failure mode.
const (
	rcFailure          = 0x101 // TPM_RC_FAILURE
	rcFailedSelfTest12 = 0x1c  // TPM_FAILEDSELFTEST
)

// getRandom is TPM2_GetRandom(8), or TPM_GetRandom(8) for TPM 1.2.
func getRandom(v spec.Version) []byte {
	if v == spec.V12 {
		return []byte{0x00, 0xc1, 0, 0, 0, 14, 0, 0, 0, 0x46, 0, 0, 0, 8}
	}
	return []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}
}

// writeState are commands the last of which makes the TPM write its
// persistent state: TPM2_NV_DefineSpace of a small index with owner
// authorisation (empty); for TPM 1.2, TSC_PhysicalPresence(present) and
// TPM_PhysicalSetDeactivated(TRUE), a permanent flag.
func writeState(v spec.Version) [][]byte {
	be := binary.BigEndian
	if v == spec.V12 {
		return [][]byte{
			{0x00, 0xc1, 0, 0, 0, 12, 0x40, 0, 0, 0x0a, 0, 0x08},
			{0x00, 0xc1, 0, 0, 0, 11, 0, 0, 0, 0x72, 1},
		}
	}
	pub := be.AppendUint32(nil, 0x01500002)        // nvIndex
	pub = be.AppendUint16(pub, 0x000b)             // nameAlg: SHA-256
	pub = be.AppendUint32(pub, 0x00060006)         // owner and auth read and write, ordinary
	pub = be.AppendUint16(pub, 0)                  // authPolicy
	pub = be.AppendUint16(pub, 8)                  // dataSize
	body := be.AppendUint32(nil, 0x40000001)       // TPM_RH_OWNER
	body = be.AppendUint32(body, 9)                // authorization area size
	body = be.AppendUint32(body, 0x40000009)       // TPM_RS_PW
	body = append(body, 0, 0, 0, 0, 0)             // nonce, attributes, hmac
	body = be.AppendUint16(body, 0)                // auth of the index
	body = be.AppendUint16(body, uint16(len(pub))) // TPM2B_NV_PUBLIC
	body = append(body, pub...)
	cmd := be.AppendUint16(nil, 0x8002)
	cmd = be.AppendUint32(cmd, uint32(10+len(body)))
	cmd = be.AppendUint32(cmd, 0x0000012a)
	return [][]byte{append(cmd, body...)}
}

// breakTPM puts the vTPM serving sock into failure mode the way a full
// disk does: its state cannot be written. It returns with the disk still
// full; free frees it (and runs when the test ends).
func breakTPM(t *testing.T, disk, sock string, v spec.Version) (free func()) {
	t.Helper()
	free = citest.Fill(t, disk)
	var rc uint32
	for _, cmd := range writeState(v) {
		rc = send(t, sock, cmd)
	}
	if rc == 0 {
		t.Fatalf("the TPM wrote its state on a full disk")
	}
	want := uint32(rcFailure)
	if v == spec.V12 {
		want = rcFailedSelfTest12
	}
	if rc := send(t, sock, getRandom(v)); rc != want {
		t.Fatalf("after a failed state write the TPM answers 0x%x, not failure mode (0x%x)", rc, want)
	}
	return free
}

// TestFailureModeRepaired: a vTPM whose TPM went into failure mode (its
// state could not be written on a full disk) does not stay `active`: with
// no client connected the agent restarts swtpm on its saved state, and
// once the disk is freed the TPM answers again; with a guest connected (its
// control channel held, as QEMU holds it) the vTPM reads `error`, saying
// why, until the guest lets go.
func TestFailureModeRepaired(t *testing.T) {
	for _, v := range []spec.Version{spec.V20, spec.V12} {
		t.Run(string(v), func(t *testing.T) {
			disk := citest.SmallDisk(t, 4<<20)
			h := newHost(t, filepath.Join(disk, "vtpms"))
			id := "0f0f0f0f-0000-4000-8000-000000000001"
			h.create(t, id, v)
			if rec := h.pass(t, id); rec.Phase != store.PhaseActive {
				t.Fatalf("phase %s (%s)", rec.Phase, rec.Reason)
			}
			sock := h.rt.Sockets(id).Data
			pid := h.rt.Running(id)

			free := breakTPM(t, disk, sock, v)
			// While the disk is full, a restart may fail the same way (TPM
			// 2.0 writes its state at Startup): active only if it answers.
			// A pass may not know yet: the sockets held are read at most a
			// second before (breakTPM held the data socket, so there was no
			// probe), and swtpm's report is read as it comes.
			var rec *store.VTPM
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
				rec = h.pass(t, id)
				rc := uint32(0)
				if rec.Phase == store.PhaseActive {
					rc = send(t, sock, getRandom(v))
				}
				if rc == 0 || time.Now().After(deadline) {
					if rc != 0 {
						t.Fatalf("disk full: active, and the TPM answers 0x%x", rc)
					}
					break
				}
			}
			if rec.Phase != store.PhaseActive && (rec.Phase != store.PhaseError || !strings.Contains(rec.Reason, "failure mode")) {
				t.Fatalf("disk full: phase %s (%s); want active and answering, or error saying failure mode", rec.Phase, rec.Reason)
			}
			free()
			rec = h.pass(t, id)
			if rc := send(t, sock, getRandom(v)); rec.Phase != store.PhaseActive || rc != 0 {
				t.Fatalf("after a pass: phase %s (%s), the TPM answers 0x%x", rec.Phase, rec.Reason, rc)
			}
			if h.rt.Running(id) == pid {
				t.Fatalf("swtpm %d was not restarted", pid)
			}

			guest, err := net.Dial("unix", h.rt.Sockets(id).Ctrl)
			if err != nil {
				t.Fatal(err)
			}
			defer guest.Close()
			breakTPM(t, disk, sock, v)()
			// With the channels held the agent cannot probe; it learns of
			// the failure from swtpm's log, which is read as it comes, so a
			// pass right after the failure may not see it yet.
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
				rec = h.pass(t, id)
				if rec.Phase != store.PhaseActive || time.Now().After(deadline) {
					break
				}
			}
			if rec.Phase != store.PhaseError || !strings.Contains(rec.Reason, "failure mode") || !strings.Contains(rec.Reason, "guest") {
				t.Fatalf("with a guest connected: phase %s (%s); want error saying failure mode and the guest", rec.Phase, rec.Reason)
			}
			guest.Close()
			waitReleased(t, h.rt.Sockets(id).Ctrl)
			rec = h.pass(t, id)
			if rc := send(t, sock, getRandom(v)); rec.Phase != store.PhaseActive || rc != 0 {
				t.Fatalf("after the guest let go: phase %s (%s), the TPM answers 0x%x", rec.Phase, rec.Reason, rc)
			}
		})
	}
}

// set changes the record of id as the API (or an older vtpmd) would.
func (h *host) set(t *testing.T, id string, change func(*store.VTPM)) {
	t.Helper()
	err := h.st.Update(context.Background(), func(tx *store.Tx) error {
		v, err := tx.GetVTPM(id)
		if err != nil {
			return err
		}
		change(v)
		return tx.UpdateVTPM(v)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestSocketsRecorded: the agent records the sockets a vTPM is served on
// with its phase, so that the API can answer from the record: set when it
// becomes active, cleared when it stops, set again when it starts, and put
// right when the record names others.
func TestSocketsRecorded(t *testing.T) {
	h := newHost(t, t.TempDir())
	id := "0f0f0f0f-0000-4000-8000-000000000002"
	h.create(t, id, spec.V20)
	want := store.Sockets{Data: h.rt.Sockets(id).Data, Ctrl: h.rt.Sockets(id).Ctrl}
	if want.Data == "" || want.Ctrl != want.Data+".ctrl" {
		t.Fatalf("the runtime serves on %+v", want)
	}
	if rec := h.pass(t, id); rec.Phase != store.PhaseActive || rec.Sockets != want || rec.PID == 0 || rec.PID != h.rt.Running(id) {
		t.Fatalf("active: phase %s, sockets %+v, swtpm %d; want %+v, %d", rec.Phase, rec.Sockets, rec.PID, want, h.rt.Running(id))
	}
	// swtpm dies; its supervisor starts another, which the next pass
	// records, saying so.
	first := h.rt.Running(id)
	syscall.Kill(first, syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); h.rt.Running(id) == first || h.rt.Running(id) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the supervisor did not restart swtpm")
		}
	}
	rec := h.pass(t, id)
	if rec.PID != h.rt.Running(id) || rec.Phase != store.PhaseActive {
		t.Fatalf("after swtpm's restart: %+v, running %d", rec, h.rt.Running(id))
	}
	var evs []store.Event
	if err := h.st.View(context.Background(), func(tx *store.Tx) (err error) { evs, err = tx.ListEvents(id, rec.Incarnation); return err }); err != nil {
		t.Fatal(err)
	}
	if e := evs[len(evs)-1]; !strings.HasPrefix(e.Action, "swtpm restarted") {
		t.Fatalf("the last event after swtpm's restart: %+v", e)
	}
	h.set(t, id, func(v *store.VTPM) { v.Desired = store.DesiredStopped })
	if rec := h.pass(t, id); rec.Phase != store.PhaseStopped || rec.Sockets != (store.Sockets{}) || rec.PID != 0 {
		t.Fatalf("stopped: phase %s, sockets %+v, swtpm %d; want none", rec.Phase, rec.Sockets, rec.PID)
	}
	h.set(t, id, func(v *store.VTPM) { v.Desired = store.DesiredRunning })
	if rec := h.pass(t, id); rec.Phase != store.PhaseActive || rec.Sockets != want {
		t.Fatalf("started again: phase %s, sockets %+v; want %+v", rec.Phase, rec.Sockets, want)
	}
	h.set(t, id, func(v *store.VTPM) {
		v.Sockets = store.Sockets{Data: "/elsewhere/tpm.sock", Ctrl: "/elsewhere/tpm.sock.ctrl"}
	})
	if rec := h.pass(t, id); rec.Phase != store.PhaseActive || rec.Sockets != want {
		t.Fatalf("after the record named other sockets: phase %s, sockets %+v; want %+v", rec.Phase, rec.Sockets, want)
	}
	before := h.pass(t, id)
	if again := h.pass(t, id); again.Generation != before.Generation {
		t.Fatalf("a pass over a vTPM as recorded wrote its record (generation %d → %d)", before.Generation, again.Generation)
	}
}

// TestGuestConnectionIsItsOwnEvent: a guest that connects while something
// else changes (here swtpm restarted, and a client connected at once) is
// recorded by the next pass as an event of its own, not hidden in the
// other change's; and disconnecting is one too.
func TestGuestConnectionIsItsOwnEvent(t *testing.T) {
	h := newHost(t, t.TempDir())
	id := "0f0f0f0f-0000-4000-8000-000000000007"
	h.create(t, id, spec.V20)
	active := h.pass(t, id)
	if active.Phase != store.PhaseActive || active.Connected {
		t.Fatalf("active: %+v", active)
	}
	first := h.rt.Running(id)
	syscall.Kill(first, syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); h.rt.Running(id) == first || h.rt.Running(id) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the supervisor did not restart swtpm")
		}
	}
	ctrl := h.rt.Sockets(id).Ctrl
	var guest net.Conn
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		c, err := net.Dial("unix", ctrl)
		if err == nil {
			guest = c
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("connecting to the restarted swtpm: %v", err)
		}
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if h.rt.Connected(id) { // what the agent asks, looked at once a second
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the runtime does not see the connection")
		}
	}
	last := func() store.Event {
		t.Helper()
		var evs []store.Event
		if err := h.st.View(context.Background(), func(tx *store.Tx) (err error) { evs, err = tx.ListEvents(id, active.Incarnation); return err }); err != nil {
			t.Fatal(err)
		}
		return evs[len(evs)-1]
	}
	if rec := h.pass(t, id); rec.Connected || !strings.HasPrefix(last().Action, "swtpm restarted") {
		t.Fatalf("after the restart: connected %v, last event %+v", rec.Connected, last())
	}
	if rec := h.pass(t, id); !rec.Connected || last().Action != "guest connected" {
		t.Fatalf("the next pass: connected %v, last event %+v", rec.Connected, last())
	}
	guest.Close()
	for deadline := time.Now().Add(10 * time.Second); h.rt.Connected(id); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the runtime still sees the guest")
		}
	}
	if rec := h.pass(t, id); rec.Connected || last().Action != "guest disconnected" {
		t.Fatalf("after the guest left: connected %v, last event %+v", rec.Connected, last())
	}
}

// TestRunRecordsHeartbeats: registering records the agent's version with
// a heartbeat, and while Run runs the agent records one every
// HeartbeatInterval, each moving the host's last heartbeat on; they stop
// when Run returns.
func TestRunRecordsHeartbeats(t *testing.T) {
	h := newHost(t, t.TempDir())
	h.a.Version, h.a.HeartbeatInterval = "v0.7.0-test", 20*time.Millisecond
	ctx := context.Background()
	if err := h.a.Register(ctx); err != nil {
		t.Fatal(err)
	}
	get := func() *store.Host {
		t.Helper()
		var host *store.Host
		if err := h.st.View(ctx, func(tx *store.Tx) (err error) { host, err = tx.GetHost("h1"); return err }); err != nil {
			t.Fatal(err)
		}
		return host
	}
	registered := get()
	if registered.Version != "v0.7.0-test" {
		t.Fatalf("registered: %+v", registered)
	}

	run, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- h.a.Run(run) }()
	last, beats := registered.HeartbeatAt, 0
	for deadline := time.Now().Add(30 * time.Second); beats < 3; time.Sleep(5 * time.Millisecond) {
		if now := get(); now.HeartbeatAt.After(last) {
			if now.Version != "v0.7.0-test" {
				t.Fatalf("a heartbeat recorded version %q", now.Version)
			}
			last, beats = now.HeartbeatAt, beats+1
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d heartbeats recorded in 30s at an interval of 20ms", beats)
		}
	}
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	stopped := get().HeartbeatAt
	time.Sleep(100 * time.Millisecond) // five intervals
	if now := get().HeartbeatAt; !now.Equal(stopped) {
		t.Fatalf("a heartbeat at %v after Run returned (last %v)", now, stopped)
	}
}

// TestPoolRekeyRecovery: a vTPM rekeyed with a pooled TPM's secret whose
// TPM was never adopted (a crash between the two steps) still comes up,
// keyed by the secret its record names: nothing is lost but the pooled
// TPM.
func TestPoolRekeyRecovery(t *testing.T) {
	h := newPooledHost(t, t.TempDir(), 1)
	ctx := context.Background()
	id := "0f0f0f0f-0000-4000-8000-0000000000a1"
	var secret []byte
	var discard func()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
		var ok bool
		if secret, _, discard, ok = h.rt.Claim(spec.V20); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no pooled TPM after a minute")
		}
	}
	h.create(t, id, spec.V20)
	r, err := h.a.Records.Get(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.a.Records.Rekey(ctx, r, secret, agent.Event{Actor: "agent:h1", Action: "adopted a pre-manufactured TPM"}); err != nil {
		t.Fatal(err)
	}
	discard() // the crash: the pooled TPM is gone, its secret recorded
	v := h.pass(t, id)
	if v.Phase != store.PhaseActive || len(v.EKs) == 0 {
		t.Fatalf("after the pass: %+v", v)
	}
	if h.rt.Adopted(id) {
		// Another pooled TPM: its own secret replaced the recorded one.
		if v.SecretID == r.SecretID {
			t.Fatalf("an adopted TPM under the secret of the lost one")
		}
	} else if v.SecretID != r.SecretID {
		t.Fatalf("manufactured on demand, but the record moved from secret %s to %s", r.SecretID, v.SecretID)
	}
	if rc := send(t, h.rt.Sockets(id).Data, getRandom(spec.V20)); rc != 0 {
		t.Fatalf("the TPM answers 0x%x", rc)
	}
}

// TestRecordGoneKeepsState: a record that leaves the host without asking
// for its deletion (a restored database that never had it) is dropped by
// the agent, never destroyed: its state stays, for the operator's drift
// repair to judge.
func TestRecordGoneKeepsState(t *testing.T) {
	h := newHost(t, t.TempDir())
	id := "0f0f0f0f-0000-4000-8000-0000000000c1"
	h.create(t, id, spec.V20)
	if v := h.pass(t, id); v.Phase != store.PhaseActive {
		t.Fatalf("phase %s", v.Phase)
	}
	ctx := context.Background()
	if err := h.st.Update(ctx, func(tx *store.Tx) error { return tx.DeleteVTPM(id) }); err != nil {
		t.Fatal(err)
	}
	if err := h.a.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if held, _ := h.a.Held(ctx); len(held) != 0 {
		t.Fatalf("the agent still holds %+v", held)
	}
	if _, err := os.Stat(filepath.Join(h.rt.Dir(id), swtpmhost.IdentityFile)); err != nil {
		t.Fatalf("the state of a record that merely left: %v", err)
	}
}
