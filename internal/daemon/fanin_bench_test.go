package daemon

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

// The fan-in benchmarks: an operator creates vTPMs over the API and waits
// for each to read active, against one control plane on PostgreSQL whose
// hosts' agents drive a load generator's backend
// (agenttest.RecordingBackend: no swtpm, a fixed certified EK pair), so
// that what is measured is the API, the agent protocol, the agents and the
// store. BenchmarkFanIn runs vtpmd server as its own process with
// VTPMD_FANIN_AGENTS (default 500) simulated hosts, each enrolled with its
// own join token and key, with its own host certificate, TLS client and
// agent.Agent on agentclient: real heartbeats, watch long polls, reports
// and secret reads over HTTPS with mTLS. BenchmarkFanInAllInOne is the
// same load on all-in-one's composition: the server in-process and one
// agent on its records (agentstore). Each op is one create through to
// active, VTPMD_FANIN_CONCURRENCY (default 4) at a time; run them with
// -benchtime Nx for N creates:
//
//	go test -run '^$' -bench FanIn -benchtime 1000x ./internal/daemon
//
// Metrics: creates/s, p50 and p99 create→active (ms); statements/create,
// the store statements run while creating less what the idle system runs
// meanwhile (heartbeats, watches rereading, periodic passes; measured
// before and after the creates), and its parts measured alone on a quiet
// server: create-stmts (the API's create) and agent-stmts (the agent's
// watch read, reports and secret read for it). BenchmarkFanIn also reports
// the server's memory per connected agent: what its RSS (and Go heap and
// stacks) grow by, averaged over ten seconds, as the second half of the
// agents connect to a freshly restarted server and sit in their watches,
// divided by those agents; and what its heap and stacks grow by as
// measured right after a collection (heap-gc, stack-gc): what those
// agents hold, less the garbage a collection would free and the stacks
// it would shrink.
func BenchmarkFanIn(b *testing.B) {
	n := envInt(b, "VTPMD_FANIN_AGENTS", 500)
	l := newFanIn(b, n)
	b.Run(fmt.Sprintf("agents=%d", n), l.run)
}

// BenchmarkFanInAllInOne: see BenchmarkFanIn. It runs on PostgreSQL, as
// the server does, and on SQLite, all-in-one's default.
func BenchmarkFanInAllInOne(b *testing.B) {
	for _, engine := range []string{"postgres", "sqlite"} {
		b.Run("store="+engine, func(b *testing.B) {
			ctx, cancel := context.WithCancel(context.Background())
			cfg := Config{DataDir: filepath.Join(b.TempDir(), "data"), Listen: freeAddr(b), HostName: "all-in-one"}
			if engine == "postgres" {
				cfg.Store = pgtest.DSN(b)
			}
			s, err := openServer(ctx, cfg, nil)
			if err != nil {
				b.Fatal(err)
			}
			s.serve()
			l := &load{op: client.New(s.OperatorURL, ""), statements: func() float64 { return float64(s.store.Statements()) }}
			// The probe's hosts take its creates; all-in-one's own, up
			// after it, takes the rest.
			l.probe(b, probeHosts(b, func(name string) *agent.Agent {
				return &agent.Agent{Host: name, Records: s.agents, Backend: &agenttest.RecordingBackend{}}
			}))
			a := &agent.Agent{Host: s.cfg.HostName, Capacity: 100000, Records: s.agents, Backend: &agenttest.RecordingBackend{},
				HeartbeatInterval: s.cfg.HeartbeatInterval}
			if err := a.Register(ctx); err != nil {
				b.Fatal(err)
			}
			var wg sync.WaitGroup
			wg.Go(func() { a.Run(ctx) })
			b.Cleanup(func() {
				cancel()
				wg.Wait()
				s.Shutdown(context.Background())
			})
			l.run(b)
		})
	}
}

// load is a control plane under the fan-in benchmarks' load.
type load struct {
	op *client.Client // the operator, on the server's socket
	// statements reads the store's statement count.
	statements func() float64
	// createStmts and agentStmts are what one create costs the API and the
	// agent, measured alone (probe).
	createStmts, agentStmts float64
	// metrics are more to report, measured at set-up.
	metrics map[string]float64
}

// probe measures what one create costs the API, and what acting on it
// costs its host's agent, on a server where nothing else runs: ten
// creates, each placed on one of hosts (registered, not running, each
// with room for one vTPM), whose agent then makes one pass (Reconcile:
// a watch read, the reports and the secret read), averaged.
func (l *load) probe(b *testing.B, hosts map[string]*agent.Agent) {
	b.Helper()
	ctx := context.Background()
	var create, act float64
	for range hosts {
		s0 := l.statements()
		v, err := l.op.Create(ctx, createRequest(uuid.NewString()))
		if err != nil {
			b.Fatal(err)
		}
		s1 := l.statements()
		if err := hosts[v.Host].Reconcile(ctx); err != nil {
			b.Fatal(err)
		}
		s2 := l.statements()
		create, act = create+s1-s0, act+s2-s1
		if v, err := l.op.Get(ctx, v.InstanceID); err != nil || v.Phase != "active" {
			b.Fatalf("a probe's vTPM after its agent's pass: %+v %v", v, err)
		}
	}
	l.createStmts, l.agentStmts = create/float64(len(hosts)), act/float64(len(hosts))
}

// probeHosts registers ten hosts with room for one vTPM each, with agents
// made by newAgent, for probe.
func probeHosts(b *testing.B, newAgent func(name string) *agent.Agent) map[string]*agent.Agent {
	b.Helper()
	hosts := map[string]*agent.Agent{}
	for i := range 10 {
		a := newAgent(fmt.Sprintf("probe-%d", i))
		a.Capacity = 1
		if err := a.Register(context.Background()); err != nil {
			b.Fatal(err)
		}
		hosts[a.Host] = a
	}
	return hosts
}

// run is b.N creates, each waited for until active, concurrency at a
// time.
func (l *load) run(b *testing.B) {
	ctx := context.Background()
	concurrency := envInt(b, "VTPMD_FANIN_CONCURRENCY", 4)
	idleBefore := l.idleRate(b)
	latencies := make([]time.Duration, b.N)
	var next atomic.Int64
	var failed atomic.Pointer[error]
	s0 := l.statements()
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for range concurrency {
		wg.Go(func() {
			for i := next.Add(1) - 1; i < int64(b.N) && failed.Load() == nil; i = next.Add(1) - 1 {
				t0 := time.Now()
				v, err := l.op.Create(ctx, createRequest(uuid.NewString()))
				if err == nil {
					v, err = l.op.Wait(ctx, v.InstanceID, func(v api.VTPM) bool { return v.Phase == "active" || v.Phase == "error" }, nil)
				}
				if err == nil && v.Phase != "active" {
					err = fmt.Errorf("%s: %s (%s)", v.InstanceID, v.Phase, v.Reason)
				}
				if err != nil {
					failed.CompareAndSwap(nil, &err)
					return
				}
				latencies[i] = time.Since(t0)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if err := failed.Load(); err != nil {
		b.Fatal(*err)
	}
	s1 := l.statements()
	idleAfter := l.idleRate(b)
	slices.Sort(latencies)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "creates/s")
	b.ReportMetric(ms(latencies[b.N/2]), "p50-ms")
	b.ReportMetric(ms(latencies[min(b.N-1, b.N*99/100)]), "p99-ms")
	b.ReportMetric((s1-s0-(idleBefore+idleAfter)/2*elapsed.Seconds())/float64(b.N), "statements/create")
	b.ReportMetric(l.createStmts, "create-stmts")
	b.ReportMetric(l.agentStmts, "agent-stmts")
	b.ReportMetric(idleBefore, "idle-stmts/s")
	for unit, v := range l.metrics {
		b.ReportMetric(v, unit)
	}
}

// idleRate is the store's statements per second while nothing but the
// agents' own background (heartbeats, watches, periodic passes) runs,
// over two periodic passes.
func (l *load) idleRate(b *testing.B) float64 {
	const over = 2 * 5 * time.Second // agent.Agent's default Interval
	s0 := l.statements()
	time.Sleep(over)
	return (l.statements() - s0) / over.Seconds()
}

// fanIn is vtpmd server as its own process on PostgreSQL, and its hosts,
// simulated in this process.
type fanIn struct {
	b      *testing.B
	bin    string
	args   []string
	log    string
	server *exec.Cmd
	scrape *http.Client // the operator's socket
}

func newFanIn(b *testing.B, agents int) *load {
	b.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	dir := b.TempDir()
	serverCA, cert, key := writeTestPKI(b, dir)
	roots, err := client.LoadCAs(serverCA)
	if err != nil {
		b.Fatal(err)
	}
	addr := freeAddr(b)
	data := filepath.Join(dir, "server")
	socket := filepath.Join(data, "api.sock")
	f := &fanIn{b: b, bin: buildVtpmd(b), log: filepath.Join(dir, "server.log"),
		args: []string{"server", "--data-dir", data, "--listen", addr, "--tls-cert", cert, "--tls-key", key, "--store", pgtest.DSN(b), "--log-level", "warn", "--backup-interval", "0"},
		scrape: &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		}}}}
	l := &load{op: client.New("unix://"+socket, "")}
	f.start()

	// Enrol every host, and ten for the probe, as an operator and the
	// hosts' agents do: a join token each, a key made by the host.
	certs := map[string]tls.Certificate{}
	var mu sync.Mutex
	names := make([]string, agents)
	for i := range names {
		names[i] = fmt.Sprintf("hv-%04d", i)
	}
	for i := range 10 {
		names = append(names, fmt.Sprintf("probe-%d", i))
	}
	anon := client.New("https://"+addr, "").WithTLS(&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12})
	parallel(b, len(names), 8, func(i int) error {
		cert, err := enrolSim(ctx, l.op, anon, names[i])
		mu.Lock()
		certs[names[i]] = cert
		mu.Unlock()
		return err
	})
	// A fresh server: its memory is the enrolled hosts' records' and no
	// enrolment's garbage.
	f.restart()
	raw := func() float64 { return f.metrics()["vtpmd_store_statements_total"] }
	r0 := raw()
	for range 10 {
		raw()
	}
	perScrape := (raw() - r0) / 11 // a scrape reads the phases
	var scrapes float64
	l.statements = func() float64 {
		scrapes++
		return raw() - perScrape*scrapes
	}

	newAgent := func(name string, inWatch *atomic.Int64) *agent.Agent {
		c := client.New("https://"+addr, "").WithTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{certs[name]}, MinVersion: tls.VersionTLS12})
		return &agent.Agent{Host: name, Capacity: 100000, Records: &watchCounter{Records: agentclient.New(c), inWatch: inWatch},
			Backend: &agenttest.RecordingBackend{}}
	}
	// The probe's hosts are the only ones up: the others have not reported
	// yet.
	l.probe(b, probeHosts(b, func(name string) *agent.Agent { return newAgent(name, new(atomic.Int64)) }))

	// The agents connect, register and sit in their watches: half of
	// them, then the rest. What a connected agent costs the server is
	// what the second half adds, for the first opens what a server keeps
	// however many connect (its store connections, its buffer pools).
	var inWatch atomic.Int64
	var wg sync.WaitGroup
	b.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	connect := func(from, to int) map[string]float64 {
		running := make([]*agent.Agent, to-from)
		parallel(b, len(running), 8, func(i int) error {
			running[i] = newAgent(names[from+i], &inWatch)
			return running[i].Register(ctx)
		})
		for _, a := range running {
			wg.Go(func() { a.Run(ctx) })
		}
		for deadline := time.Now().Add(2 * time.Minute); inWatch.Load() < int64(to); time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				b.Fatalf("%d of %d agents in their watch after two minutes", inWatch.Load(), to)
			}
		}
		time.Sleep(5 * time.Second) // a heartbeat and a periodic pass each
		m := f.memoryOver(10 * time.Second)
		f.collect()
		collected := f.memory()
		m["heap-gc"], m["stack-gc"] = collected["heap"], collected["stack"]
		return m
	}
	half := connect(0, agents/2)
	all := connect(agents/2, agents)
	l.metrics = map[string]float64{}
	for name, unit := range map[string]string{"rss": "server-rss-KiB/agent", "heap": "server-heap-KiB/agent", "stack": "server-stack-KiB/agent",
		"heap-gc": "server-heap-gc-KiB/agent", "stack-gc": "server-stack-gc-KiB/agent", "goroutines": "server-goroutines/agent"} {
		per := (all[name] - half[name]) / float64(agents-agents/2)
		if name != "goroutines" {
			per /= 1024
		}
		l.metrics[unit] = per
	}
	b.Logf("server with %d agents connected: RSS %.1f MiB, heap %.1f MiB, stacks %.1f MiB, %0.f goroutines; with %d: %.1f, %.1f, %.1f MiB, %.0f",
		agents/2, half["rss"]/(1<<20), half["heap"]/(1<<20), half["stack"]/(1<<20), half["goroutines"],
		agents, all["rss"]/(1<<20), all["heap"]/(1<<20), all["stack"]/(1<<20), all["goroutines"])
	return l
}

// enrolSim enrols host name as vtpmd agent does at its first start (a join
// token from the operator, a key made here, a certificate for it) and
// returns the certificate.
func enrolSim(ctx context.Context, op, anon *client.Client, name string) (tls.Certificate, error) {
	tok, err := op.JoinToken(ctx, name, 0)
	if err != nil {
		return tls.Certificate{}, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	e, err := anon.Enroll(ctx, api.EnrollRequest{JoinToken: tok.Token, CSR: csr})
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("enrolling %s: %w", name, err)
	}
	return tls.Certificate{Certificate: [][]byte{e.Certificate}, PrivateKey: key}, nil
}

func (f *fanIn) start() {
	f.b.Helper()
	out, err := os.OpenFile(f.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		f.b.Fatal(err)
	}
	defer out.Close()
	cmd := exec.Command(f.bin, f.args...)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		f.b.Fatal(err)
	}
	f.server = cmd
	f.b.Cleanup(func() {
		stop(cmd, syscall.SIGKILL)
		if f.b.Failed() {
			log, _ := os.ReadFile(f.log)
			f.b.Logf("server.log:\n%s", tail(log, 40))
		}
	})
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if _, err := f.get(); err == nil {
			return
		} else if time.Now().After(deadline) {
			f.b.Fatalf("the server does not answer: %v", err)
		}
	}
}

func (f *fanIn) restart() {
	f.b.Helper()
	stop(f.server, syscall.SIGTERM)
	f.start()
}

// get reads the server's metrics.
func (f *fanIn) get() (map[string]float64, error) { return scrapeMetrics(f.scrape) }

// scrapeMetrics reads the unlabelled metrics of the server c reaches on
// its operator's socket.
func scrapeMetrics(c *http.Client) (map[string]float64, error) {
	resp, err := c.Get("http://vtpmd/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("/metrics: %s", resp.Status)
	}
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if ok && !strings.HasPrefix(name, "#") && !strings.Contains(name, "{") {
			if v, err := strconv.ParseFloat(value, 64); err == nil {
				m[name] = v
			}
		}
	}
	return m, sc.Err()
}

func (f *fanIn) metrics() map[string]float64 {
	f.b.Helper()
	m, err := f.get()
	if err != nil {
		f.b.Fatal(err)
	}
	if _, ok := m["vtpmd_store_statements_total"]; !ok {
		f.b.Fatal("the server's metrics lack vtpmd_store_statements_total")
	}
	return m
}

// collect has the server collect its garbage: twice, for a collection
// halves a parked goroutine's stack at most once (each time a heap
// profile taken after a collection, from the operator's socket).
func (f *fanIn) collect() {
	f.b.Helper()
	for range 2 {
		resp, err := f.scrape.Get("http://vtpmd/debug/pprof/heap?gc=1")
		if err != nil {
			f.b.Fatal(err)
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			f.b.Fatalf("a heap profile: %s %v", resp.Status, err)
		}
	}
}

// memoryOver is the server's memory (see memory) sampled every second
// over d, averaged: a sample alone falls anywhere between two garbage
// collections.
func (f *fanIn) memoryOver(d time.Duration) map[string]float64 {
	f.b.Helper()
	avg := map[string]float64{}
	n := int(d / time.Second)
	for range n {
		for k, v := range f.memory() {
			avg[k] += v / float64(n)
		}
		time.Sleep(time.Second)
	}
	return avg
}

// memory is the server's resident set (from /proc), Go heap in use,
// goroutine stacks and goroutines (from its metrics).
func (f *fanIn) memory() map[string]float64 {
	f.b.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", f.server.Process.Pid))
	if err != nil {
		f.b.Fatal(err)
	}
	var rssKiB float64
	for line := range strings.SplitSeq(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			rssKiB, err = strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			if err != nil {
				f.b.Fatal(err)
			}
		}
	}
	m := f.metrics()
	return map[string]float64{"rss": rssKiB * 1024, "heap": m["go_memstats_heap_inuse_bytes"], "stack": m["go_memstats_stack_inuse_bytes"],
		"goroutines": m["go_goroutines"]}
}

// watchCounter counts the agent's watches in flight.
type watchCounter struct {
	agent.Records
	inWatch *atomic.Int64
}

func (w *watchCounter) Watch(ctx context.Context, host string, since int64, wait time.Duration) (*agent.Changes, error) {
	w.inWatch.Add(1)
	defer w.inWatch.Add(-1)
	return w.Records.Watch(ctx, host, since, wait)
}

// parallel runs do(0..n-1), workers at a time, and fails b on the first
// error.
func parallel(b *testing.B, n, workers int, do func(i int) error) {
	b.Helper()
	var next atomic.Int64
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := next.Add(1) - 1; i < int64(n) && errs[w] == nil; i = next.Add(1) - 1 {
				errs[w] = do(int(i))
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		b.Fatal(err)
	}
}

// envInt is the environment variable name as a number, or def.
func envInt(b *testing.B, name string, def int) int {
	b.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		b.Fatalf("%s=%q: want a positive number", name, s)
	}
	return n
}
