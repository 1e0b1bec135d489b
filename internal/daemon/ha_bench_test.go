package daemon

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/agent/agentclient"
	"github.com/vtpmd/vtpmd/internal/agent/agenttest"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

// The HA benchmarks run N vtpmd server processes (replicas) on one
// throwaway PostgreSQL database, as several replicas behind a load
// balancer: the load generator (this process) spreads its requests over
// them round robin. Each replica has its own data dir, API socket and
// HTTPS address; they share the master key file, and through the store the
// deployment's keys and the key manager's secrets.
//
//	go test -run '^$' -bench HA -benchtime 3000x ./internal/daemon
//
// BenchmarkHAAttest (replicas=1,2,3): 10,000 registered instances (written
// to the store as a registration leaves them, with one software P-256 AK
// and agent token for all), whose agents push evidence over HTTPS (nonce,
// then quote, each to the next replica), VTPMD_HA_CONCURRENCY (default 16)
// at a time; b.N pushes. Meanwhile a prober flips the verdict of one of
// 100 other instances at a time (its evidence alternates between another
// boot and the learned one) and waits for the webhook receiver to see the
// change: detect-p50/p99-ms, from pushing the evidence. evidence/s counts
// both. Reported too, per push: the CPU the replicas, PostgreSQL and the
// load generator spent (from /proc) and the SQL statements the replicas
// ran (their /metrics), and alone, on the idle cluster before the load
// (the difference: transactions PostgreSQL aborted as serialization
// failures, run again); pushes refused with 409 conflict (a transaction
// that lost 20 times), which the load generator pushes again as an agent
// does; and webhook deliveries received more than once.
// The host of the instances has no agent; the replicas run with
// --heartbeat-window 1h so that it does not read down meanwhile.
//
// BenchmarkHACreate (replicas=1,2): b.N creates through to active, over
// the replicas round robin, VTPMD_HA_CONCURRENCY at a time, on 10
// simulated hosts (agent.Agent on agentclient, agenttest.RecordingBackend)
// connected to the replicas in turn; creates refused with 409 and other
// failures are counted, not fatal, unless no create went through at all.
// CPU and statements per create as above.
//
// BenchmarkHAWake: a long poll on a vTPM (GET /v1/vtpms/{id}?wait= with
// its ETag) held on replica A, the vTPM stopped or started through replica
// B: b.N times, the delay from sending the change to B until A answers.

// haCluster is N vtpmd server replicas on one PostgreSQL database, and
// what else a cluster has: agents added with addAgent reach the server at
// addr, which a test sets to a load balancer's in front of the replicas.
type haCluster struct {
	*cluster
	masterKey string // every replica's
	replicas  []*replica
	spread    rr
	closers   []func() // more to stop with the replicas
}

// stop kills the replicas (and what else closers hold), before the
// benchmark ends.
func (h *haCluster) stop() {
	for _, r := range h.replicas {
		stop(r.cmd, syscall.SIGKILL)
	}
	for _, c := range h.closers {
		c()
	}
}

// replica is one vtpmd server process.
type replica struct {
	addr   string // HTTPS
	socket string // the operator's API socket
	cmd    *exec.Cmd
	op     *client.Client
	https  *client.Client // anonymous, over HTTPS
	probe  *http.Client   // HTTPS, for the health checks
	scrape *http.Client   // the operator's socket, for /metrics
}

// health is the status GET path (/healthz, /readyz) answers over HTTPS,
// as a load balancer's health check reads it.
func (r *replica) health(path string) (int, error) {
	resp, err := r.probe.Get("https://" + r.addr + path)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// statements is the SQL statements the replicas have run so far.
func (h *haCluster) statements(b *testing.B) float64 {
	b.Helper()
	var n float64
	for _, r := range h.replicas {
		m, err := scrapeMetrics(r.scrape)
		if err != nil {
			b.Fatal(err)
		}
		n += m["vtpmd_store_statements_total"]
	}
	return n
}

// newHACluster starts n replicas, each with the extra flags, and returns
// once every one reads ready.
func newHACluster(t testing.TB, n int, flags ...string) *haCluster {
	t.Helper()
	dir := t.TempDir()
	c := &cluster{t: t, bin: buildVtpmd(t), dsn: pgtest.DSN(t), dir: filepath.Join(dir, "data-0"), agents: map[string]*clusterAgent{}}
	c.serverCA, c.cert, c.key = writeTestPKI(t, dir)
	h := &haCluster{cluster: c, masterKey: filepath.Join(dir, "master.key"), spread: rr{n: n}}
	// The master key is made once, before the first start, and every
	// replica reads it, as docs/deployment.md tells operators.
	if _, err := embedded.NewMasterKeyFile(h.masterKey); err != nil {
		t.Fatal(err)
	}
	pool, err := client.LoadCAs(c.serverCA)
	if err != nil {
		t.Fatal(err)
	}
	trust := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	// All at once, on the empty database: one of them makes the schema
	// and the deployment's keys, the others wait and open them. Each has
	// a data dir of its own, as replicas on their own machines do.
	for i := range n {
		r := &replica{addr: freeAddr(t), socket: filepath.Join(dir, fmt.Sprintf("api-%d.sock", i))}
		args := []string{"server", "--data-dir", filepath.Join(dir, fmt.Sprintf("data-%d", i)), "--master-key-file", h.masterKey, "--api-socket", r.socket,
			"--listen", r.addr, "--tls-cert", c.cert, "--tls-key", c.key, "--store", c.dsn, "--log-level", "warn", "--backup-interval", "0"}
		r.cmd = c.start(filepath.Join(dir, fmt.Sprintf("replica-%d.log", i)), append(args, flags...)...)
		r.op = client.New("unix://"+r.socket, "")
		r.scrape = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", r.socket)
		}}}
		r.https = client.New("https://"+r.addr, "").WithTLS(trust)
		r.probe = &http.Client{Transport: &http.Transport{TLSClientConfig: trust}, Timeout: 10 * time.Second}
		h.replicas = append(h.replicas, r)
	}
	for i, r := range h.replicas {
		c.eventually(fmt.Sprintf("replica %d reads ready", i), func() error {
			if status, err := r.health("/readyz"); err != nil || status != http.StatusOK {
				return fmt.Errorf("/readyz: %d %v", status, err)
			}
			return nil
		})
	}
	c.op = h.replicas[0].op
	return h
}

// rr is a round robin over the replicas.
type rr struct {
	n    int
	next atomic.Int64
}

func (r *rr) pick() int { return int((r.next.Add(1) - 1) % int64(r.n)) }

// store opens the cluster's database from this process, to set up what
// a benchmark needs faster than through the API.
func (h *haCluster) store() *store.Store {
	h.t.Helper()
	st, err := store.OpenPostgres(context.Background(), h.dsn, store.Options{})
	if err != nil {
		h.t.Fatal(err)
	}
	h.closers = append(h.closers, func() { st.Close() })
	return st
}

// cpu is the CPU time (user and system) spent so far by the replicas, by
// PostgreSQL (its postmaster and backends, all databases: only this
// benchmark's is busy) and by this process (the load generator).
func (h *haCluster) cpu(b *testing.B) (replicas, postgres, load time.Duration) {
	b.Helper()
	// pgtest's server: its socket directory is the DSN's host, its data
	// directory within, whose postmaster.pid names it.
	var postmaster int
	for f := range strings.FieldsSeq(h.dsn) {
		if dir, ok := strings.CutPrefix(f, "host="); ok {
			pid, err := os.ReadFile(filepath.Join(dir, "data", "postmaster.pid"))
			if err != nil {
				b.Fatal(err)
			}
			postmaster, _ = strconv.Atoi(strings.SplitN(string(pid), "\n", 2)[0])
		}
	}
	children := map[int][]int{}
	entries, _ := os.ReadDir("/proc")
	ticks := map[int]time.Duration{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid … utime stime: fields 4, 14, 15; comm may hold spaces.
		f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
		ppid, _ := strconv.Atoi(f[1])
		utime, _ := strconv.Atoi(f[11])
		stime, _ := strconv.Atoi(f[12])
		children[ppid] = append(children[ppid], pid)
		ticks[pid] = time.Duration(utime+stime) * 10 * time.Millisecond // USER_HZ is 100
	}
	var walk func(pid int) time.Duration
	walk = func(pid int) time.Duration {
		t := ticks[pid]
		for _, c := range children[pid] {
			t += walk(c)
		}
		return t
	}
	for _, r := range h.replicas {
		replicas += walk(r.cmd.Process.Pid)
	}
	return replicas, walk(postmaster), ticks[os.Getpid()]
}

func BenchmarkHAAttest(b *testing.B) {
	for _, n := range []int{1, 2, 3} {
		// Set up once for the runs b.Run makes, and gone before the next.
		h, run := attestLoad(b, n)
		b.Run(fmt.Sprintf("replicas=%d", n), run)
		h.stop()
	}
}

const (
	haInstances = 10000
	haProbes    = 100 // of them, the prober's
)

// attestLoad sets up BenchmarkHAAttest's cluster of n replicas, and
// returns it and the benchmark.
func attestLoad(b *testing.B, n int) (*haCluster, func(*testing.B)) {
	ctx := context.Background()
	concurrency := envInt(b, "VTPMD_HA_CONCURRENCY", 16)

	// The webhook receiver notes when each instance's verdict arrives.
	type seen struct{ id, verdict string }
	var mu sync.Mutex
	arrived := map[seen]chan struct{}{}
	var deliveries, duplicates atomic.Int64
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body api.VerdictToken
		json.NewDecoder(r.Body).Decode(&body)
		var claims struct{ Sub, Verdict string }
		if parts := strings.Split(body.Token, "."); len(parts) == 3 {
			payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
			json.Unmarshal(payload, &claims)
		}
		deliveries.Add(1)
		mu.Lock()
		defer mu.Unlock()
		k := seen{claims.Sub, claims.Verdict}
		ch, ok := arrived[k]
		if !ok {
			ch = make(chan struct{})
			arrived[k] = ch
		}
		select {
		case <-ch:
			duplicates.Add(1)
		default:
			close(ch)
		}
	}))
	waitFor := func(k seen) chan struct{} {
		mu.Lock()
		defer mu.Unlock()
		ch, ok := arrived[k]
		if !ok {
			ch = make(chan struct{})
			arrived[k] = ch
		}
		return ch
	}
	forget := func(k seen) {
		mu.Lock()
		defer mu.Unlock()
		delete(arrived, k)
	}

	// The instances' host has no agent: it must not read down (and
	// touch its 10,000 vTPMs) while the benchmark runs.
	h := newHACluster(b, n, "--webhook-url", receiver.URL, "--heartbeat-window", "1h")
	h.closers = append(h.closers, receiver.Close)
	log, err := os.ReadFile("../attest/testdata/ovmf-q35-eventlog.bin")
	if err != nil {
		b.Fatal(err)
	}
	events, err := attest.ParseEventLog(log)
	if err != nil {
		b.Fatal(err)
	}
	good := map[int][]byte{}
	for i, v := range attest.Replay(events) {
		if i < 8 {
			good[i] = v
		}
	}
	bad := maps.Clone(good)
	bad[4] = bytes.Repeat([]byte{0x4b}, 32)

	// Registered instances, as activation leaves them, and a learned
	// policy: one AK and one agent token serve them all.
	akKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	akPublic := attesttest.ECCAKPublic(&akKey.PublicKey)
	const token = "agent-token"
	tokenHash := sha256.Sum256([]byte(token))
	ids := make([]string, haInstances)
	st := h.store()
	for from := 0; from < haInstances; from += 500 {
		err := st.Update(ctx, func(tx *store.Tx) error {
			if from == 0 {
				if err := tx.PutHost(&store.Host{Name: "h1", Traits: []string{}, Capacity: haInstances, Backend: "swtpm"}); err != nil {
					return err
				}
			}
			for i := from; i < from+500; i++ {
				ids[i] = fmt.Sprintf("00000000-0000-4000-8000-%012d", i)
				if err := tx.CreateVTPM(&store.VTPM{InstanceID: ids[i], Project: "p1", Spec: spec.Spec{Version: spec.V20, Model: spec.TIS},
					Host: "h1", Desired: store.DesiredRunning, Phase: store.PhaseActive, SecretID: ids[i]}); err != nil {
					return err
				}
				if err := tx.PutAttestation(&store.Attestation{InstanceID: ids[i], EKKind: "rsa2048", AKPublic: akPublic,
					RegisteredAt: time.Now(), AgentTokenHash: tokenHash[:], Verdict: store.VerdictTrusted, PolicyPCRs: good,
					PolicyEventLog: log, EventLog: log, EvidenceAt: time.Now()}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}

	// The agents' requests, as a load balancer in front of the replicas
	// makes them: kept-alive HTTPS connections (HTTP/1.1), enough for
	// every request in flight.
	pool, err := client.LoadCAs(h.serverCA)
	if err != nil {
		b.Fatal(err)
	}
	web := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
		MaxIdleConnsPerHost: 2 * concurrency}}
	post := func(id, op string, in, out any) error {
		var body []byte // none for the nonce: a body-less route refuses one
		if in != nil {
			body, _ = json.Marshal(in)
		}
		url := "https://" + h.replicas[h.spread.pick()].addr + "/v1/vtpms/" + id + "/attestation/" + op
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := web.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		data, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode != http.StatusOK {
			var e api.ErrorBody
			json.Unmarshal(data, &e)
			err = &pushError{op: op, id: id, status: resp.StatusCode, code: e.Error.Code, body: data}
		}
		if err != nil {
			return err
		}
		return json.Unmarshal(data, out)
	}
	var clockMu sync.Mutex
	clocks := map[string]uint64{}
	// push sends evidence for id quoting pcrs: a nonce from one replica,
	// the quote to the next.
	var conflicts atomic.Int64
	var pushOnce func(id string, pcrs map[int][]byte) (api.Attestation, error)
	// push, as an agent does, pushes again (a new nonce) when a replica
	// answers 409 conflict: its transaction kept losing to others.
	push := func(id string, pcrs map[int][]byte) (a api.Attestation, err error) {
		for range 5 {
			a, err = pushOnce(id, pcrs)
			var pe *pushError
			if !errors.As(err, &pe) || pe.status != http.StatusConflict || pe.code != api.CodeConflict {
				return a, err
			}
			conflicts.Add(1)
		}
		return a, err
	}
	pushOnce = func(id string, pcrs map[int][]byte) (api.Attestation, error) {
		var nonce api.Nonce
		if err := post(id, "nonce", nil, &nonce); err != nil {
			return api.Attestation{}, err
		}
		clockMu.Lock()
		clocks[id] += 1000
		clock := clocks[id]
		clockMu.Unlock()
		q, sig, err := attesttest.Quote(akKey, nonce.Nonce, pcrs, clock)
		if err != nil {
			return api.Attestation{}, err
		}
		var a api.Attestation
		err = post(id, "evidence", api.EvidenceRequest{Nonce: nonce.Nonce, Attest: q, Signature: sig, PCRs: pcrs, EventLog: log}, &a)
		return a, err
	}

	// What a push costs alone, on an idle cluster: its statements, with
	// no transaction lost to a concurrent one and run again.
	s0 := h.statements(b)
	for i := range 10 {
		if _, err := push(ids[i], good); err != nil {
			b.Fatal(err)
		}
	}
	alone := (h.statements(b) - s0) / 10
	untrusted := map[string]bool{} // the prober's instances, as it left them
	return h, func(b *testing.B) {
		r0, p0, l0 := h.cpu(b)
		s0 := h.statements(b)
		d0, c0 := deliveries.Load(), conflicts.Load()
		// The prober: one verdict change at a time, until the load is done.
		var latencies []time.Duration
		var proberErr error
		done := make(chan struct{})
		var probing sync.WaitGroup
		probing.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				id := ids[haInstances-haProbes+i%haProbes]
				pcrs, verdict := bad, string(store.VerdictUntrusted)
				if untrusted[id] {
					pcrs, verdict = good, string(store.VerdictTrusted)
				}
				untrusted[id] = !untrusted[id]
				k := seen{id, verdict}
				forget(k)
				ch := waitFor(k)
				t0 := time.Now()
				a, err := push(id, pcrs)
				if err == nil && a.Verdict != verdict {
					err = fmt.Errorf("%s: verdict %s, want %s", id, a.Verdict, verdict)
				}
				if err != nil {
					proberErr = err
					return
				}
				select {
				case <-ch:
					latencies = append(latencies, time.Since(t0))
				case <-time.After(time.Minute):
					proberErr = fmt.Errorf("no webhook for %s turning %s within a minute", id, verdict)
					return
				}
			}
		})

		var next atomic.Int64
		var failed atomic.Pointer[error]
		b.ResetTimer()
		start := time.Now()
		var wg sync.WaitGroup
		for range concurrency {
			wg.Go(func() {
				for i := next.Add(1) - 1; i < int64(b.N) && failed.Load() == nil; i = next.Add(1) - 1 {
					// Every instance in turn, in no order of their
					// keys (as agents push), never one twice at a
					// time: its clock must only go forward.
					id := ids[int(i)*7919%(haInstances-haProbes)]
					a, err := push(id, good)
					if err == nil && a.Verdict != string(store.VerdictTrusted) {
						err = fmt.Errorf("%s: %s %v", id, a.Verdict, a.Reasons)
					}
					if err != nil {
						failed.CompareAndSwap(nil, &err)
					}
				}
			})
		}
		wg.Wait()
		elapsed := time.Since(start)
		b.StopTimer()
		close(done)
		probing.Wait()
		r1, p1, l1 := h.cpu(b)
		s1 := h.statements(b)
		if err := failed.Load(); err != nil {
			b.Fatal(*err)
		}
		if proberErr != nil {
			b.Fatal(proberErr)
		}
		if len(latencies) == 0 {
			b.Fatal("the prober saw no verdict change")
		}
		slices.Sort(latencies)
		ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
		pushes := float64(b.N + len(latencies)) // the prober's too
		per := func(d time.Duration) float64 { return ms(d) / pushes }
		b.ReportMetric(pushes/elapsed.Seconds(), "evidence/s")
		b.ReportMetric(ms(latencies[len(latencies)/2]), "detect-p50-ms")
		b.ReportMetric(ms(latencies[len(latencies)*99/100]), "detect-p99-ms")
		b.ReportMetric(float64(len(latencies)), "detections")
		b.ReportMetric(per(r1-r0), "replica-cpu-ms/push")
		b.ReportMetric(per(p1-p0), "postgres-cpu-ms/push")
		b.ReportMetric(per(l1-l0), "loadgen-cpu-ms/push")
		b.ReportMetric(float64(duplicates.Load()), "webhook-duplicates")
		b.ReportMetric(float64(conflicts.Load()-c0), "conflicts-409")
		b.ReportMetric((s1-s0)/pushes, "statements/push")
		b.ReportMetric(alone, "statements/push-alone")
		b.Logf("%d replicas: %d pushes and %d verdict changes probed in %v, %d webhook deliveries (%d more than once)",
			n, b.N, len(latencies), elapsed.Round(time.Millisecond), deliveries.Load()-d0, duplicates.Load())
	}
}

// pushError is a replica's refusal of a push.
type pushError struct {
	op, id string
	status int
	code   api.Code
	body   []byte
}

func (e *pushError) Error() string {
	return fmt.Sprintf("%s of %s: %d %s", e.op, e.id, e.status, e.body)
}

func BenchmarkHACreate(b *testing.B) {
	for _, n := range []int{1, 2} {
		h, run := createLoad(b, n)
		b.Run(fmt.Sprintf("replicas=%d", n), run)
		h.stop()
	}
}

// createLoad sets up BenchmarkHACreate's cluster of n replicas and its
// hosts, and returns it and the benchmark.
func createLoad(b *testing.B, n int) (*haCluster, func(*testing.B)) {
	ctx, cancel := context.WithCancel(context.Background())
	concurrency := envInt(b, "VTPMD_HA_CONCURRENCY", 16)
	h := newHACluster(b, n)
	pool, err := client.LoadCAs(h.serverCA)
	if err != nil {
		b.Fatal(err)
	}
	// Ten hosts, enrolled as vtpmd agent enrols, each connected to a
	// replica in turn.
	const hosts = 10
	running := make([]*agent.Agent, hosts)
	parallel(b, hosts, 4, func(i int) error {
		r := h.replicas[i%n]
		name := fmt.Sprintf("hv-%02d", i)
		cert, err := enrolSim(ctx, r.op, r.https, name)
		if err != nil {
			return err
		}
		c := client.New("https://"+r.addr, "").WithTLS(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
		running[i] = &agent.Agent{Host: name, Capacity: 100000, Records: agentclient.New(c), Backend: &agenttest.RecordingBackend{}}
		return running[i].Register(ctx)
	})
	var agents sync.WaitGroup
	h.closers = append(h.closers, func() {
		cancel()
		agents.Wait()
	})
	for _, a := range running {
		agents.Go(func() { a.Run(ctx) })
	}
	for _, a := range running {
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
			host, err := h.replicas[0].op.GetHost(ctx, a.Host)
			if err == nil && host.State == "up" {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("host %s not up after a minute: %+v %v", a.Host, host, err)
			}
		}
	}

	return h, func(b *testing.B) {
		latencies := make([]time.Duration, b.N)
		var next, refused, errs atomic.Int64
		var firstErr atomic.Pointer[error]
		r0, p0, l0 := h.cpu(b)
		s0 := h.statements(b)
		b.ResetTimer()
		start := time.Now()
		var wg sync.WaitGroup
		for range concurrency {
			wg.Go(func() {
				for i := next.Add(1) - 1; i < int64(b.N); i = next.Add(1) - 1 {
					t0 := time.Now()
					op := h.replicas[h.spread.pick()].op
					v, err := op.Create(ctx, createRequest(uuid.NewString()))
					if err == nil {
						// Waited for through the next replica.
						v, err = h.replicas[h.spread.pick()].op.Wait(ctx, v.InstanceID, func(v api.VTPM) bool { return v.Phase == "active" || v.Phase == "error" }, nil)
					}
					if err == nil && v.Phase != "active" {
						err = fmt.Errorf("%s: %s (%s)", v.InstanceID, v.Phase, v.Reason)
					}
					var ce *client.Error
					switch {
					case errors.As(err, &ce) && ce.Status == http.StatusConflict:
						refused.Add(1)
					case err != nil:
						errs.Add(1)
						firstErr.CompareAndSwap(nil, &err)
					}
					latencies[i] = time.Since(t0)
				}
			})
		}
		wg.Wait()
		elapsed := time.Since(start)
		b.StopTimer()
		r1, p1, l1 := h.cpu(b)
		s1 := h.statements(b)
		if err := firstErr.Load(); err != nil {
			b.Logf("%d creates failed (not 409); the first: %v", errs.Load(), *err)
		}
		if refused.Load()+errs.Load() == int64(b.N) { // else it timed refusals alone
			b.Fatalf("not one of %d creates went through: %d refused with 409, %d failed", b.N, refused.Load(), errs.Load())
		}
		slices.Sort(latencies)
		ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
		per := func(d time.Duration) float64 { return ms(d) / float64(b.N) }
		b.ReportMetric(float64(b.N)/elapsed.Seconds(), "creates/s")
		b.ReportMetric(ms(latencies[b.N/2]), "p50-ms")
		b.ReportMetric(ms(latencies[min(b.N-1, b.N*99/100)]), "p99-ms")
		b.ReportMetric(float64(refused.Load()), "refused-409")
		b.ReportMetric(float64(errs.Load()), "failed")
		b.ReportMetric(per(r1-r0), "replica-cpu-ms/create")
		b.ReportMetric(per(p1-p0), "postgres-cpu-ms/create")
		b.ReportMetric(per(l1-l0), "loadgen-cpu-ms/create")
		b.ReportMetric((s1-s0)/float64(b.N), "statements/create")
	}
}

func BenchmarkHAWake(b *testing.B) {
	ctx := context.Background()
	h := newHACluster(b, 2, "--heartbeat-window", "1h")
	const id = "00000000-0000-4000-8000-00000000a11e"
	err := h.store().Update(ctx, func(tx *store.Tx) error {
		if err := tx.PutHost(&store.Host{Name: "h1", Traits: []string{}, Capacity: 1, Backend: "swtpm"}); err != nil {
			return err
		}
		return tx.CreateVTPM(&store.VTPM{InstanceID: id, Project: "p1", Spec: spec.Spec{Version: spec.V20, Model: spec.TIS},
			Host: "h1", Desired: store.DesiredRunning, Phase: store.PhaseActive, SecretID: id})
	})
	if err != nil {
		b.Fatal(err)
	}
	a, via := h.replicas[0], h.replicas[1].op
	// A's long poll, raw: the ETag the client has, ?wait=.
	poll := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", a.socket)
	}}}
	get := func(etag string) (string, int, error) {
		req, _ := http.NewRequest(http.MethodGet, "http://vtpmd/v1/vtpms/"+id+"?wait=30s", nil)
		if etag != "" {
			req.Header.Set("If-None-Match", etag)
		}
		resp, err := poll.Do(req)
		if err != nil {
			return "", 0, err
		}
		defer resp.Body.Close()
		return resp.Header.Get("ETag"), resp.StatusCode, nil
	}
	etag, _, err := get("")
	if err != nil {
		b.Fatal(err)
	}
	delays := make([]time.Duration, b.N)
	b.ResetTimer()
	for i := range b.N {
		woke := make(chan error, 1)
		var t1 time.Time
		go func() {
			tag, status, err := get(etag)
			t1 = time.Now()
			if err == nil && status != http.StatusOK {
				err = fmt.Errorf("the long poll answered %d", status)
			}
			etag = tag
			woke <- err
		}()
		time.Sleep(20 * time.Millisecond) // A holds the poll
		t0 := time.Now()
		change := via.Stop
		if i%2 == 1 {
			change = via.Start
		}
		if _, err := change(ctx, id); err != nil {
			b.Fatal(err)
		}
		if err := <-woke; err != nil {
			b.Fatal(err)
		}
		delays[i] = t1.Sub(t0)
	}
	b.StopTimer()
	slices.Sort(delays)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(delays[b.N/2]), "wake-p50-ms")
	b.ReportMetric(ms(delays[min(b.N-1, b.N*99/100)]), "wake-p99-ms")
}
