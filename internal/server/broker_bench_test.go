package server

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keyrelease"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// benchInstances are the trusted instances the release benchmarks spread
// their releases over (each a real swtpm, manufactured and attested).
var benchInstances = []string{
	"7d7a0c4e-8f4b-4bd2-9d6e-2b8f4f3c1a10", "0b5c6b8e-1f0a-4c61-9a1e-5d3b6a7c8d90", "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b",
	"3c2b1a09-8f7e-4d6c-9b5a-493827160504", "5f0e4d3c-2b1a-4098-8f7e-6d5c4b3a2910", "6a5b4c3d-2e1f-4a0b-9c8d-7e6f5a4b3c2d",
	"8b7a6958-4d3c-4b2a-8190-a1b2c3d4e5f6", "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
}

// releaseBench is a fixture with trusted instances on a trusted host, each
// with a secret released to it.
type releaseBench struct {
	f       *fixture
	guests  []*guest
	handler http.Handler
}

func newReleaseBench(b *testing.B) *releaseBench {
	b.Helper()
	rb := &releaseBench{f: newFixture(b)}
	rb.handler = rb.f.srv.Config.Handler
	hostVerdict(b, rb.f, store.VerdictTrusted, time.Now().Add(time.Hour)) // fresh for the whole run
	for _, id := range benchInstances {
		rb.guests = append(rb.guests, trustedGuest(b, rb.f, id, "p1"))
	}
	if code := rb.f.call(b, "POST", "/v1/broker/secrets", "p1", api.CreateBrokerSecretRequest{Name: "disk", Payload: make([]byte, 64),
		ReleaseTo: benchInstances, MaxEvidenceAge: "1h"}, nil); code != 201 {
		b.Fatalf("create: %d", code)
	}
	return rb
}

// serve has the API's handler answer instance i's agent's release
// request, in this process, as the server does once a request has
// arrived: routing, the release, the JSON answer.
func (rb *releaseBench) serve(b *testing.B, i int) {
	i %= len(benchInstances)
	r := httptest.NewRequest("POST", "/v1/vtpms/"+benchInstances[i]+"/secrets/disk/release", nil)
	r.Header.Set("Authorization", "Bearer "+rb.guests[i].agent.Token())
	w := httptest.NewRecorder()
	rb.handler.ServeHTTP(w, r)
	if w.Code != http.StatusOK {
		b.Errorf("release: %d %s", w.Code, w.Body)
	}
}

func quantile(ds []time.Duration, q float64) time.Duration {
	slices.Sort(ds)
	return ds[min(len(ds)-1, int(float64(len(ds))*q))]
}

// BenchmarkRelease measures the key broker, with 8 trusted instances (real
// swtpm vTPMs) on a trusted host, on the store storetest opens (SQLite;
// VTPMD_TEST_STORE=postgres for PostgreSQL):
//
//   - server: the broker's cost of one release (Broker.Release: the checks,
//     the payload and the record in one transaction, MakeCredential to
//     the EK and the AES-GCM seal), one after another;
//
//   - handler: the server's whole answer to an agent's request once it
//     has arrived (the API's handler: routing, the release, the JSON
//     answer), one after another;
//
//   - paced-500/s, paced-1000/s: requests arriving at that rate (open
//     loop, 8 workers) to the handler, for b.N requests; each reports the
//     server-side p50/p99 and the rate reached;
//
//   - guest: a guest agent's whole request over HTTP to the secret opened
//     in its vTPM (ActivateCredential in swtpm).
//
//     go test -run '^$' -bench Release -benchtime 5000x ./internal/server
func BenchmarkRelease(b *testing.B) {
	rb := newReleaseBench(b)
	ctx := context.Background()

	b.Run("server", func(b *testing.B) {
		ds := make([]time.Duration, 0, b.N)
		for i := 0; b.Loop(); i++ {
			g := i % len(benchInstances)
			t0 := time.Now()
			if _, err := rb.f.api.Broker.Release(ctx, tenant.Caller{}, benchInstances[g], rb.guests[g].agent.Token(), "disk"); err != nil {
				b.Fatal(err)
			}
			ds = append(ds, time.Since(t0))
		}
		b.ReportMetric(float64(quantile(ds, 0.5).Microseconds()), "p50-µs")
		b.ReportMetric(float64(quantile(ds, 0.99).Microseconds()), "p99-µs")
	})

	b.Run("handler", func(b *testing.B) {
		ds := make([]time.Duration, 0, b.N)
		for i := 0; b.Loop(); i++ {
			t0 := time.Now()
			rb.serve(b, i)
			ds = append(ds, time.Since(t0))
		}
		b.ReportMetric(float64(quantile(ds, 0.5).Microseconds()), "p50-µs")
		b.ReportMetric(float64(quantile(ds, 0.99).Microseconds()), "p99-µs")
	})

	for _, rate := range []int{500, 1000} {
		b.Run(fmt.Sprintf("paced-%d/s", rate), func(b *testing.B) {
			const workers = 8
			n := b.N
			jobs := make(chan time.Time, n)
			ds := make([]time.Duration, n)
			var wg sync.WaitGroup
			var next atomic.Int64
			start := time.Now()
			for range workers {
				wg.Go(func() {
					for due := range jobs {
						i := int(next.Add(1) - 1)
						if d := time.Until(due); d > 0 {
							time.Sleep(d)
						}
						t0 := time.Now()
						rb.serve(b, i)
						ds[i] = time.Since(t0)
					}
				})
			}
			b.ResetTimer()
			for i := range n {
				jobs <- start.Add(time.Duration(i) * time.Second / time.Duration(rate))
			}
			close(jobs)
			wg.Wait()
			took := time.Since(start)
			b.ReportMetric(float64(n)/took.Seconds(), "releases/s")
			b.ReportMetric(float64(quantile(ds, 0.5).Microseconds()), "p50-µs")
			b.ReportMetric(float64(quantile(ds, 0.99).Microseconds()), "p99-µs")
		})
	}

	b.Run("guest", func(b *testing.B) {
		g := rb.guests[0]
		ds := make([]time.Duration, 0, b.N)
		for b.Loop() {
			t0 := time.Now()
			if _, _, err := keyrelease.Fetch(ctx, g.agent, benchInstances[0], "disk"); err != nil {
				b.Fatal(err)
			}
			ds = append(ds, time.Since(t0))
		}
		b.ReportMetric(float64(quantile(ds, 0.5).Microseconds()), "p50-µs")
		b.ReportMetric(float64(quantile(ds, 0.99).Microseconds()), "p99-µs")
	})
}
