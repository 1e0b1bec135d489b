package console

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
)

// BenchmarkInstancesPage renders the Instances page over 10,000
// instances (20 hosts, every fourth instance untrusted, a tenth never
// registered), as the operator: the first page, sorted by verdict, a
// filter, the last page. Each iteration is one page of each kind; the
// metrics are the server's time per page (p50, p99, from the request
// arriving to the last byte written) and the bytes of the first page.
func BenchmarkInstancesPage(b *testing.B) {
	st := storetest.Open(b)
	fill(b, st, 10000)
	c := New(Config{Store: st, Authenticate: func(*http.Request) (Viewer, bool, error) { return Viewer{Name: "bench"}, true, nil }})
	h := c.Handler()
	pages := []string{"/ui/instances", "/ui/instances?sort=verdict&dir=desc", "/ui/instances?verdict=untrusted&sort=evidence",
		"/ui/instances?page=200", "/ui/instances?q=00000000-0000-4000-8000-0000000012"}
	var times []time.Duration
	var first int
	b.ResetTimer()
	for b.Loop() {
		for i, p := range pages {
			w := httptest.NewRecorder()
			start := time.Now()
			h.ServeHTTP(w, httptest.NewRequest("GET", p, nil))
			times = append(times, time.Since(start))
			if w.Code != 200 {
				b.Fatalf("%s: %d", p, w.Code)
			}
			if i == 0 {
				first = w.Body.Len()
			}
		}
	}
	b.StopTimer()
	for i, p := range pages {
		var mine []time.Duration
		for j := i; j < len(times); j += len(pages) {
			mine = append(mine, times[j])
		}
		slices.Sort(mine)
		b.Logf("%s: p50 %v p99 %v", p, mine[len(mine)/2], mine[len(mine)*99/100])
	}
	slices.Sort(times)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(times[len(times)/2]), "p50-ms")
	b.ReportMetric(ms(times[len(times)*99/100]), "p99-ms")
	b.ReportMetric(float64(first)/1024, "first-page-KiB")
}

// fill stores n instances on 20 hosts with their attestations.
func fill(b *testing.B, st *store.Store, n int) {
	b.Helper()
	ctx := context.Background()
	err := st.Update(ctx, func(tx *store.Tx) error {
		for h := range 20 {
			if err := tx.PutHost(&store.Host{Name: fmt.Sprintf("compute-%02d", h), Traits: []string{spec.TraitTPM20}, Capacity: 1000, Backend: "swtpm"}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now().UTC()
	for batch := 0; batch < n; batch += 1000 {
		err := st.Update(ctx, func(tx *store.Tx) error {
			for i := batch; i < min(batch+1000, n); i++ {
				id := fmt.Sprintf("00000000-0000-4000-8000-%012d", i)
				v := &store.VTPM{InstanceID: id, Project: fmt.Sprintf("project-%02d", i%50), Host: fmt.Sprintf("compute-%02d", i%20),
					Spec: spec.Spec{Version: spec.V20, Model: spec.CRB, SecretSecurity: spec.User}, Desired: store.DesiredRunning, Phase: store.PhaseActive,
					SecretID: "s", EKs: []store.EK{{Kind: "rsa2048", PublicDER: []byte{1}, CertDER: []byte{2}}}}
				if err := tx.CreateVTPM(v); err != nil {
					return err
				}
				if i%10 == 9 {
					continue
				}
				verdict := store.VerdictTrusted
				if i%4 == 0 {
					verdict = store.VerdictUntrusted
				}
				a := &store.Attestation{InstanceID: id, Verdict: verdict, PolicyName: "gold", RegisteredAt: now,
					EvidenceAt: now.Add(-time.Duration(i) * time.Second), Reasons: []string{"PCR 4 differs"}}
				if err := tx.PutAttestation(a); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}
