package daemon

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" driver, to read schema_version

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// TestHACluster is issue 14's demonstration, with real processes on a
// real PostgreSQL: three vtpmd server replicas started at the same moment
// on an empty database, a TCP load balancer in front of them through which
// two vtpmd agents (swtpm, room for 8 vTPMs each) enrol and run, and an
// operator whose requests go to the replicas round robin.
//
//   - Started together, the replicas apply each migration once, all read
//     ready, and hold one CA.
//   - 300 creates at once over the three (50 instances asked for twice, on
//     two replicas): each is made (202) or refused with 409 no_valid_host
//     or already_exists; the hosts fill to their capacity and no further,
//     no instance has two vTPMs, and every vTPM made runs.
//   - A replica is killed (SIGKILL) in the middle of a burst of deletes,
//     creates and webhook deliveries. The requests it took are sent again
//     to the others and end done or refused cleanly; nothing is half-made
//     (every record's secret exists, every vTPM settles, each host runs
//     exactly its vTPMs' swtpm); every delivery reaches the receiver, in
//     order per instance, once by its delivery id, or twice when the
//     killed replica had claimed it and never recorded it made.
//   - PostgreSQL is stopped for 10 s under creates and reads over the two
//     replicas left: they answer 503 store_unavailable meanwhile (/readyz
//     503, /healthz 200), and serve again by themselves once it is back;
//     what they answered 503 to, sent again, is made once; the agents
//     carry on, and a vTPM created after it runs.
func TestHACluster(t *testing.T) {
	swtpmtest.Require(t)
	ctx := context.Background()
	hooks := &countingReceiver{t: t, delay: 100 * time.Millisecond}
	receiver := httptest.NewServer(hooks)
	defer receiver.Close()
	h := newHACluster(t, 3, "--webhook-url", receiver.URL, "--heartbeat-window", "30s")
	st := h.store()
	kr, err := embedded.Open(ctx, st, h.masterKey)
	if err != nil {
		t.Fatal(err)
	}

	// Started together: one schema, one CA.
	db, err := sql.Open("pgx", h.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var rows, versions, top int
	if err := db.QueryRow(`SELECT COUNT(*), COUNT(DISTINCT version), MAX(version) FROM schema_version`).Scan(&rows, &versions, &top); err != nil {
		t.Fatal(err)
	}
	if rows != versions || versions != top {
		t.Fatalf("schema_version: %d rows, %d versions, up to %d; want each version once", rows, versions, top)
	}
	if err := st.SchemaCurrent(ctx); err != nil {
		t.Fatal(err)
	}
	ca, err := h.replicas[0].op.CA(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range h.replicas[1:] {
		if other, err := r.op.CA(ctx); err != nil || string(other) != string(ca) {
			t.Fatalf("replica %d's CA is not replica 0's: %v", i+1, err)
		}
	}

	h.addr = balance(t, h.replicas)
	capacity := map[string]int{"hv-a": 8, "hv-b": 8}
	for name, n := range capacity {
		h.addAgent(name, n)
	}
	want := map[string]bool{} // the instances that have a vTPM

	// 300 creates at once.
	const distinct, twice = 250, 50
	var ids []string
	for range distinct {
		ids = append(ids, uuid.NewString())
	}
	asks := append(slices.Clone(ids), ids[:twice]...) // ask i and i+250 on two replicas
	errs := make([]error, len(asks))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, id := range asks {
		wg.Go(func() {
			<-start
			_, errs[i] = h.replicas[i%len(h.replicas)].op.Create(ctx, createRequest(id))
		})
	}
	close(start)
	wg.Wait()
	answers := map[string]int{}
	for i, err := range errs {
		answers[answer(err)]++
		switch status, code := refusal(err); {
		case err == nil && !want[asks[i]]:
			want[asks[i]] = true
		case err == nil:
			t.Errorf("instance %s was created twice", asks[i])
		case status == http.StatusConflict && code == api.CodeNoValidHost:
		case status == http.StatusConflict && code == api.CodeAlreadyExists && (i < twice || i >= distinct):
		default:
			t.Errorf("create %d of %s: %v", i, asks[i], err)
		}
	}
	t.Logf("300 creates: %v", answers)
	if len(want) != 16 {
		t.Errorf("%d vTPMs made; want 16, the hosts' room", len(want))
	}
	h.settled(st, kr, want, capacity)

	// A replica killed in the middle of a burst of deletes, creates and
	// webhook deliveries.
	const instances, each = 6, 8
	if err := enqueueDeliveries(ctx, st, instances, each); err != nil {
		t.Fatal(err)
	}
	type request struct {
		id         string
		delete     bool
		failedOver bool
		err        error
	}
	var burst []*request
	for id := range want {
		if len(burst) < 8 {
			burst = append(burst, &request{id: id, delete: true})
		}
	}
	for range 16 {
		burst = append(burst, &request{id: uuid.NewString()})
	}
	var answered atomic.Int64
	next := make(chan *request, len(burst))
	for _, r := range burst {
		next <- r
	}
	close(next)
	for range 4 {
		wg.Go(func() {
			for r := range next {
				r.failedOver, r.err = h.send(func(op *client.Client) (err error) {
					if r.delete {
						_, err = op.Delete(ctx, r.id)
					} else {
						_, err = op.Create(ctx, createRequest(r.id))
					}
					return err
				})
				answered.Add(1)
			}
		})
	}
	h.eventually("a third of the burst answered, deliveries under way", func() error {
		if n := answered.Load(); n < int64(len(burst)/3) || hooks.count() == 0 {
			return fmt.Errorf("%d requests answered, %d deliveries received", n, hooks.count())
		}
		return nil
	})
	// The victim: a replica holding claims on deliveries, if one does.
	victim := h.replicas[1]
	outbox, err := deliveries(ctx, st)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range outbox {
		for _, r := range h.replicas {
			if claimant(d) == r.cmd.Process.Pid {
				victim = r
			}
		}
	}
	stop(victim.cmd, syscall.SIGKILL)
	// What it had claimed and not recorded made when it died: the
	// receiver may have it already.
	unrecorded := map[string]bool{}
	if outbox, err = deliveries(ctx, st); err != nil {
		t.Fatal(err)
	}
	for _, d := range outbox {
		if claimant(d) == victim.cmd.Process.Pid {
			unrecorded[d.DeliveryID] = true
		}
	}
	live := slices.DeleteFunc(slices.Clone(h.replicas), func(r *replica) bool { return r == victim })
	h.op = live[0].op
	wg.Wait()
	failedOver := 0
	answers = map[string]int{}
	for _, r := range burst {
		answers[answer(r.err)]++
		status, code := refusal(r.err)
		if r.failedOver {
			failedOver++
		}
		switch {
		case r.delete && (r.err == nil || r.failedOver && status == http.StatusNotFound):
			delete(want, r.id)
		case r.delete:
			t.Errorf("delete of %s: %v", r.id, r.err)
		case r.err == nil || r.failedOver && code == api.CodeAlreadyExists:
			want[r.id] = true
		case status == http.StatusConflict && code == api.CodeNoValidHost:
		default:
			t.Errorf("create of %s: %v", r.id, r.err)
		}
	}
	h.eventually("the outbox is empty", func() error {
		if left, err := deliveries(ctx, st); err != nil || len(left) > 0 {
			return fmt.Errorf("%d left, %v", len(left), err)
		}
		return nil
	})
	orphans := h.settled(st, kr, want, capacity)
	if len(orphans) > failedOver {
		t.Errorf("%d secrets no record names, %d requests were cut by the kill: %v", len(orphans), failedOver, orphans)
	}
	got := hooks.receipts()
	times := map[string]int{}
	for _, r := range got {
		times[r.id]++
	}
	repeats := 0
	for id, n := range times {
		if n > 1 {
			repeats++
		}
		if n > 2 || n == 2 && !unrecorded[id] {
			t.Errorf("delivery %s received %d times; the killed replica held %d unrecorded ones, not it", id, n, len(unrecorded))
		}
	}
	if len(times) != instances*each {
		t.Errorf("%d deliveries received, want %d", len(times), instances*each)
	}
	if err := inOrder(got); err != nil {
		t.Error(err)
	}
	t.Logf("killed replica (pid %d) in a burst of 8 deletes and 16 creates (answers %v): %d sent again to another replica, %d secrets left by a request it cut; "+
		"%d deliveries, %d receipts: %d delivered again after the lease, of the %d it had claimed and not recorded made (posted, or being posted, as it died)",
		victim.cmd.Process.Pid, answers, failedOver, len(orphans), len(times), len(got), repeats, len(unrecorded))

	// PostgreSQL stopped for 10 s under creates and reads over the two
	// replicas left.
	var mu sync.Mutex
	var again []string // creates answered 503
	unavailable, iterations := 0, 0
	done := make(chan struct{})
	for w := range 2 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				id := uuid.NewString()
				_, err := live[(w+i)%2].op.Create(ctx, createRequest(id))
				_, listErr := live[(w+i+1)%2].op.List(ctx, client.ListOptions{Limit: 5})
				mu.Lock()
				iterations++
				switch status, code := refusal(err); {
				case err == nil:
					want[id] = true
				case status == http.StatusConflict && code == api.CodeNoValidHost:
				case status == http.StatusServiceUnavailable && code == api.CodeStoreUnavailable:
					again = append(again, id)
					unavailable++
				default:
					t.Errorf("create while PostgreSQL stops and starts: %v", err)
				}
				switch status, code := refusal(listErr); {
				case listErr == nil:
				case status == http.StatusServiceUnavailable && code == api.CodeStoreUnavailable:
					unavailable++
				default:
					t.Errorf("list while PostgreSQL stops and starts: %v", listErr)
				}
				mu.Unlock()
				if err != nil {
					time.Sleep(200 * time.Millisecond) // as a client told to retry
				}
			}
		})
	}
	loaded := func(more int) {
		t.Helper()
		mu.Lock()
		goal := iterations + more
		mu.Unlock()
		h.eventually(fmt.Sprintf("%d more rounds of load", more), func() error {
			mu.Lock()
			defer mu.Unlock()
			if iterations < goal {
				return fmt.Errorf("%d rounds, want %d", iterations, goal)
			}
			return nil
		})
	}
	loaded(5)
	halted := time.Now()
	pgtest.Halt(t)
	var someID string // one of the vTPMs
	for id := range want {
		someID = id
		break
	}
	for i, r := range live {
		_, createErr := r.op.Create(ctx, createRequest(uuid.NewString()))
		_, getErr := r.op.Get(ctx, someID)
		for _, err := range []error{createErr, getErr} {
			if status, code := refusal(err); status != http.StatusServiceUnavailable || code != api.CodeStoreUnavailable {
				t.Errorf("replica %d while PostgreSQL is down: %v, want 503 store_unavailable", i, err)
			}
		}
		if status, err := r.health("/healthz"); status != http.StatusOK {
			t.Errorf("replica %d's /healthz while PostgreSQL is down: %d %v, want 200", i, status, err)
		}
		if status, err := r.health("/readyz"); status != http.StatusServiceUnavailable {
			t.Errorf("replica %d's /readyz while PostgreSQL is down: %d %v, want 503", i, status, err)
		}
	}
	time.Sleep(time.Until(halted.Add(10 * time.Second)))
	pgtest.Resume(t)
	resumed := time.Now()
	for i, r := range live {
		h.eventually(fmt.Sprintf("replica %d reads ready again", i), func() error {
			if status, err := r.health("/readyz"); status != http.StatusOK {
				return fmt.Errorf("/readyz: %d %v", status, err)
			}
			return nil
		})
	}
	recovered := time.Since(resumed)
	loaded(5)
	close(done)
	wg.Wait()
	if unavailable == 0 {
		t.Error("no request of the load met the outage")
	}
	for _, id := range again {
		_, err := live[0].op.Create(ctx, createRequest(id))
		switch status, code := refusal(err); {
		case err == nil:
			want[id] = true
		case code == api.CodeAlreadyExists:
			want[id] = true
			t.Logf("create of %s committed as PostgreSQL went (answered 503)", id)
		case status == http.StatusConflict && code == api.CodeNoValidHost:
		default:
			t.Errorf("create of %s again after the outage: %v", id, err)
		}
	}
	for name := range capacity {
		h.waitHost(name, "up")
	}
	// The agents carry on: a vTPM deleted through one replica goes, and
	// one created through the other runs, waited for (long polls) on the
	// first.
	h.op = live[1].op
	if _, err := live[0].op.Delete(ctx, someID); err != nil {
		t.Fatal(err)
	}
	delete(want, someID)
	h.eventually("the deleted vTPM is gone", func() error {
		if _, err := h.op.Get(ctx, someID); !client.IsNotFound(err) {
			return fmt.Errorf("still there (%v)", err)
		}
		return nil
	})
	last := uuid.NewString()
	if _, err := live[0].op.Create(ctx, createRequest(last)); err != nil {
		t.Fatal(err)
	}
	want[last] = true
	h.wait(last, "active")
	// A create answered 503 whose commit's outcome was unknown (the
	// connection went as it committed) keeps its secret, for vtpmd to
	// reclaim if no record names it.
	if orphans = h.settled(st, kr, want, capacity); len(orphans) > failedOver+len(again) {
		t.Errorf("%d secrets no record names; %d requests were cut by the kill, %d answered 503", len(orphans), failedOver, len(again))
	}
	t.Logf("PostgreSQL down for %v: %d answers 503 store_unavailable, %d creates sent again; every replica ready %v after it was back; %d secrets no record names",
		resumed.Sub(halted).Round(time.Second), unavailable, len(again), recovered.Round(time.Millisecond), len(orphans))
}

// settled waits until the vTPMs are exactly those of the instances in
// want, each active, and every agent runs one swtpm for each of its host's
// vTPMs. No host may hold more than its capacity, and every record's
// secret must be in the key manager. It returns the key manager's secrets
// no record names (a request cut short may leave one, for vtpmd to
// reclaim).
func (h *haCluster) settled(st *store.Store, kr *embedded.Keyring, want map[string]bool, capacity map[string]int) []string {
	h.t.Helper()
	ctx := context.Background()
	var vs []*store.VTPM
	h.eventually("the vTPMs settle", func() error {
		if err := st.View(ctx, func(tx *store.Tx) (err error) { vs, err = tx.ListVTPMs(store.Filter{}); return err }); err != nil {
			return err
		}
		onHost := map[string]int{}
		for _, v := range vs {
			if !want[v.InstanceID] || v.Phase != store.PhaseActive {
				return fmt.Errorf("%s: %s, desired %s (reason %q)", v.InstanceID, v.Phase, v.Desired, v.Reason)
			}
			onHost[v.Host]++
		}
		if len(vs) != len(want) {
			return fmt.Errorf("%d vTPMs, want %d", len(vs), len(want))
		}
		for name, a := range h.agents {
			if n := len(swtpmPIDs(a)); n != onHost[name] {
				return fmt.Errorf("%s runs %d swtpm for %d vTPMs", name, n, onHost[name])
			}
		}
		return nil
	})
	onHost := map[string]int{}
	named := map[string]bool{}
	for _, v := range vs {
		onHost[v.Host]++
		named[v.SecretID] = true
	}
	for name, n := range onHost {
		if n > capacity[name] {
			h.t.Errorf("host %s holds %d vTPMs, capacity %d", name, n, capacity[name])
		}
	}
	held, err := kr.List(ctx)
	if err != nil {
		h.t.Fatal(err)
	}
	for id := range named {
		if !slices.Contains(held, id) {
			h.t.Errorf("secret %s of a vTPM is not in the key manager", id)
		}
	}
	return slices.DeleteFunc(held, func(id string) bool { return named[id] })
}

// send sends an operator's request to the replicas round robin, as a load
// balancer does; one whose replica does not answer (gone: its socket
// refuses, or the connection breaks) goes to the next (failedOver).
func (h *haCluster) send(do func(op *client.Client) error) (failedOver bool, err error) {
	first := h.spread.pick()
	for k := range h.replicas {
		err = do(h.replicas[(first+k)%len(h.replicas)].op)
		var answered *client.Error
		if err == nil || errors.As(err, &answered) {
			return k > 0, err
		}
	}
	return true, err
}

// balance starts a TCP load balancer in front of the replicas, as HAProxy
// in TCP mode: each connection goes to the next replica round robin, or
// the one after if that one refuses it (gone); TLS, and agents' client
// certificates, go through to the replica. It returns its address.
func balance(t *testing.T, replicas []*replica) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var open []net.Conn
	track := func(c net.Conn) {
		mu.Lock()
		defer mu.Unlock()
		open = append(open, c)
	}
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range open {
			c.Close()
		}
	})
	var next atomic.Int64
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			track(in)
			go func() {
				first := int(next.Add(1))
				for k := range replicas {
					out, err := net.DialTimeout("tcp", replicas[(first+k)%len(replicas)].addr, 10*time.Second)
					if err != nil {
						continue
					}
					track(out)
					go func() { io.Copy(out, in); out.Close() }()
					io.Copy(in, out)
					in.Close()
					return
				}
				in.Close()
			}()
		}
	}()
	return ln.Addr().String()
}

// countingReceiver is the operator's webhook receiver: it notes each delivery
// as it arrives, and answers after delay, as a receiver that acts on it
// does, so that the servers hold claims at any moment.
type countingReceiver struct {
	t     *testing.T
	delay time.Duration
	mu    sync.Mutex
	got   []receipt
}

func (cr *countingReceiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rec, err := readReceipt(r)
	if err != nil {
		cr.t.Error(err)
	}
	cr.mu.Lock()
	cr.got = append(cr.got, rec)
	cr.mu.Unlock()
	time.Sleep(cr.delay)
}

func (cr *countingReceiver) count() int {
	cr.mu.Lock()
	defer cr.mu.Unlock()
	return len(cr.got)
}

func (cr *countingReceiver) receipts() []receipt {
	cr.mu.Lock()
	defer cr.mu.Unlock()
	return slices.Clone(cr.got)
}

// deliveries is what the webhook outbox holds.
func deliveries(ctx context.Context, st *store.Store) (ds []store.Delivery, err error) {
	err = st.View(ctx, func(tx *store.Tx) error { ds, err = tx.Deliveries(1000); return err })
	return ds, err
}

// refusal is the status and code of an API's error answer; 0 and "" for
// none (no error, or no answer).
func refusal(err error) (int, api.Code) {
	var e *client.Error
	if errors.As(err, &e) {
		return e.Status, e.Code
	}
	return 0, ""
}

// answer names an outcome of a request: 202, or the refusal.
func answer(err error) string {
	if status, code := refusal(err); status != 0 {
		return fmt.Sprintf("%d %s", status, code)
	}
	if err != nil {
		return err.Error()
	}
	return "202"
}
