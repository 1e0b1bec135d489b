package server

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/bearer"
	"github.com/vtpmd/vtpmd/internal/keyrelease"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// releaseInstances is how many trusted instances the server-side release
// runs spread their releases over, as a fleet's boots do: each asks for
// its secret about once per boot, so two releases to one instance at once
// (which on PostgreSQL serialize on its release record, one retried) are
// rare.
const releaseInstances = 256

// releaseBench is a fixture with releaseInstances trusted instances on a
// trusted host, each with a secret released by policy, and one more
// instance on a real swtpm vTPM (manufactured, certified and attested)
// with a secret of its own.
type releaseBench struct {
	f         *fixture
	handler   http.Handler
	instances []string
	guest     *guest
}

const guestInstance = "7d7a0c4e-8f4b-4bd2-9d6e-2b8f4f3c1a10"

func newReleaseBench(b *testing.B) *releaseBench {
	b.Helper()
	rb := &releaseBench{f: newFixture(b)}
	rb.handler = rb.f.srv.Config.Handler
	ctx := context.Background()
	hostVerdict(b, rb.f, store.VerdictTrusted, time.Now().Add(time.Hour)) // fresh for the whole run
	rb.guest = trustedGuest(b, rb.f, guestInstance, "p1")
	if code := rb.f.call(b, "POST", "/v1/broker/secrets", "p1", api.CreateBrokerSecretRequest{Name: "guest-disk", Payload: make([]byte, 64),
		ReleaseTo: []string{guestInstance}, MaxEvidenceAge: "1h"}, nil); code != 201 {
		b.Fatalf("create: %d", code)
	}

	// The fleet's instances share one EK (certified by the deployment CA)
	// and one AK, made in software: the server's work is the same as for
	// a vTPM's, and making 256 RSA keys would take minutes here.
	ekKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	ekCert, err := rb.f.deploymentCA.IssueVTPMEK(&ekKey.PublicKey, "2.0")
	if err != nil {
		b.Fatal(err)
	}
	ekDER, err := x509.MarshalPKIXPublicKey(&ekKey.PublicKey)
	if err != nil {
		b.Fatal(err)
	}
	akKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	akPublic := attesttest.AKPublic(attest.RSAAKTemplate, akKey)
	if code := rb.f.call(b, "POST", "/v1/policies", "p1", api.CreatePolicyRequest{Name: "fleet", PCRs: map[int]string{0: strings.Repeat("00", 32)}}, nil); code != 201 {
		b.Fatalf("policy: %d", code)
	}
	evidence := time.Now().Add(time.Hour) // fresh for the whole run
	err = rb.f.store.Update(ctx, func(tx *store.Tx) error {
		if err := tx.PutHost(&store.Host{Name: "h2", Traits: []string{}, Capacity: releaseInstances, Backend: "swtpm"}); err != nil {
			return err
		}
		fleet, err := tx.GetPolicy("p1", "fleet")
		if err != nil {
			return err
		}
		if err := tx.PutAttestation(&store.Attestation{InstanceID: store.HostKey("h2"), RegisteredAt: time.Now(), EvidenceAt: evidence,
			Verdict: store.VerdictTrusted}); err != nil {
			return err
		}
		for i := range releaseInstances {
			id := fmt.Sprintf("00000000-0000-4000-8000-%012d", i)
			rb.instances = append(rb.instances, id)
			if err := tx.CreateVTPM(&store.VTPM{InstanceID: id, Project: "p1", Spec: spec.Spec{Version: spec.V20, Model: spec.TIS},
				Host: "h2", Desired: store.DesiredRunning, Phase: store.PhaseActive, SecretID: id,
				EKs: []store.EK{{Kind: "rsa2048", Handle: 0x81010001, PublicDER: ekDER, CertDER: ekCert}}}); err != nil {
				return err
			}
			if err := tx.PutAttestation(&store.Attestation{InstanceID: id, EKKind: "rsa2048", AKPublic: akPublic, AgentTokenHash: bearer.Hash(benchToken(id)),
				RegisteredAt: time.Now(), EvidenceAt: evidence, Verdict: store.VerdictTrusted, PolicyName: "fleet", PolicyID: fleet.ID,
				PCRs: map[int][]byte{0: make([]byte, 32)}, PolicyPCRs: map[int][]byte{0: make([]byte, 32)}}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	if code := rb.f.call(b, "POST", "/v1/broker/secrets", "p1", api.CreateBrokerSecretRequest{Name: "disk", Payload: make([]byte, 64),
		Policy: "fleet", MaxEvidenceAge: "1h"}, nil); code != 201 {
		b.Fatalf("create: %d", code)
	}
	return rb
}

// benchToken is the agent token of a fleet instance.
func benchToken(id string) string { return "agent of " + id }

// serve has the API's handler answer fleet instance i's agent's release
// request, in this process, as the server does once a request has
// arrived: routing, the release, the JSON answer.
func (rb *releaseBench) serve(b *testing.B, i int) {
	id := rb.instances[i%len(rb.instances)]
	r := httptest.NewRequest("POST", "/v1/vtpms/"+id+"/secrets/disk/release", nil)
	r.Header.Set("Authorization", "Bearer "+benchToken(id))
	w := httptest.NewRecorder()
	rb.handler.ServeHTTP(w, r)
	if w.Code != http.StatusOK {
		b.Errorf("release: %d %s", w.Code, w.Body)
	}
}

// reportLatency reports the median and 99th percentile of ds.
func reportLatency(b *testing.B, ds []time.Duration) {
	b.ReportMetric(float64(quantile(ds, 0.5).Microseconds()), "p50-µs")
	b.ReportMetric(float64(quantile(ds, 0.99).Microseconds()), "p99-µs")
}

func quantile(ds []time.Duration, q float64) time.Duration {
	slices.Sort(ds)
	return ds[min(len(ds)-1, int(float64(len(ds))*q))]
}

// BenchmarkRelease measures the key broker, on the store storetest opens
// (SQLite; VTPMD_TEST_STORE=postgres for PostgreSQL), with a fleet of
// trusted instances on a trusted host and one real swtpm vTPM:
//
//   - server: the broker's cost of one release (Broker.Release: the checks,
//     the payload and the record in one transaction, MakeCredential to
//     the EK and the AES-GCM seal), one after another;
//
//   - handler: the server's whole answer to an agent's request once it
//     has arrived (the API's handler: routing, the release, the JSON
//     answer), one after another;
//
//   - paced-500/s, paced-1000/s, paced-2000/s: requests arriving at that rate (open
//     loop, 8 workers) to the handler, for b.N requests; each reports the
//     server-side p50/p99 and the rate reached;
//
//   - guest: a guest agent's whole request over HTTP to the secret opened
//     in its vTPM (ActivateCredential in swtpm).
//
//     go test -run '^$' -bench Release -benchtime 5000x ./internal/server
func BenchmarkRelease(b *testing.B) {
	TuneGC() // as vtpmd runs; GOGC in the environment overrides it
	rb := newReleaseBench(b)
	ctx := context.Background()

	b.Run("server", func(b *testing.B) {
		ds := make([]time.Duration, 0, b.N)
		for i := 0; b.Loop(); i++ {
			id := rb.instances[i%len(rb.instances)]
			t0 := time.Now()
			if _, err := rb.f.api.Broker.Release(ctx, tenant.Caller{}, id, benchToken(id), "disk"); err != nil {
				b.Fatal(err)
			}
			ds = append(ds, time.Since(t0))
		}
		reportLatency(b, ds)
	})

	b.Run("handler", func(b *testing.B) {
		ds := make([]time.Duration, 0, b.N)
		for i := 0; b.Loop(); i++ {
			t0 := time.Now()
			rb.serve(b, i)
			ds = append(ds, time.Since(t0))
		}
		reportLatency(b, ds)
	})

	for _, rate := range []int{500, 1000, 2000} {
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
			retries := rb.f.store.Retries()
			b.ResetTimer()
			for i := range n {
				jobs <- start.Add(time.Duration(i) * time.Second / time.Duration(rate))
			}
			close(jobs)
			wg.Wait()
			took := time.Since(start)
			b.ReportMetric(float64(n)/took.Seconds(), "releases/s")
			b.ReportMetric(float64(rb.f.store.Retries()-retries)/float64(n), "retries/op")
			reportLatency(b, ds)
		})
	}

	b.Run("guest", func(b *testing.B) {
		ds := make([]time.Duration, 0, b.N)
		for b.Loop() {
			t0 := time.Now()
			if _, _, err := keyrelease.Fetch(ctx, rb.guest.agent, guestInstance, "guest-disk"); err != nil {
				b.Fatal(err)
			}
			ds = append(ds, time.Since(t0))
		}
		reportLatency(b, ds)
	})
}
