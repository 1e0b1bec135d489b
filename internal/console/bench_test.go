package console

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
)

// BenchmarkInstancesPage renders the Instances page over 10,000
// instances (20 hosts, every fourth instance untrusted, a tenth never
// registered), for the operator signed in with a session cookie, on
// SQLite and on PostgreSQL in one run: the first page, sorted by verdict,
// a filter, the last page (rows 9,951–10,000, by its link's place), a
// search. Each iteration is one page of each kind; the metrics are the
// server's time per page (p50, p99, from the request arriving to the last
// byte written) and the bytes of the first page. It logs each kind's
// times, and the count of matches alone (the unfiltered table's, the
// largest) as the page's transaction runs it.
//
// ENGINE-page-200 and ENGINE-after-200 render page 200 alone (the last,
// rows 9,951–10,000), the first by ?page=200 (an offset scan for the row
// it starts after, then the page by place), the second by its link's
// place (?after=), on the same 10,000 instances: what a typed page
// number costs over a Next link.
func BenchmarkInstancesPage(b *testing.B) {
	const n = 10000
	last := fmt.Sprintf("00000000-0000-4000-8000-%012d", n-PageSize-1)
	after200 := "/ui/instances?after=" + place{Sort: store.SortInstance, Value: last, ID: last, N: n - PageSize}.String()
	for _, engine := range []string{"sqlite", "postgres"} {
		// Filled once for the engine's three, when the first runs; open
		// until the last is done (the parent's cleanup).
		var c *Console
		var session *http.Cookie
		parent := b
		setup := func(b *testing.B) (*Console, *http.Cookie) {
			if c == nil {
				st := storetest.OpenEngine(parent, engine)
				fill(b, st, n)
				c = New(Config{Store: st})
				session = signIn(b, c, Viewer{Name: "bench"})
			}
			return c, session
		}
		b.Run(engine, func(b *testing.B) {
			c, session := setup(b)
			benchInstancesPage(b, c, session, n, after200)
		})
		for name, path := range map[string]string{"page-200": "/ui/instances?page=200", "after-200": after200} {
			b.Run(engine+"-"+name, func(b *testing.B) {
				c, session := setup(b)
				benchOnePage(b, c.Handler(), session, path, fmt.Sprintf("Instances %d–%d of %d", n-PageSize+1, n, n))
			})
		}
	}
}

// benchOnePage renders path again and again, failing unless the page
// says want (its rows' numbering), and reports the server's time per
// page.
func benchOnePage(b *testing.B, h http.Handler, session *http.Cookie, path, want string) {
	var times []time.Duration
	for b.Loop() {
		w := httptest.NewRecorder()
		r := httptest.NewRequest("GET", path, nil)
		r.AddCookie(session)
		start := time.Now()
		h.ServeHTTP(w, r)
		times = append(times, time.Since(start))
		if w.Code != 200 || !strings.Contains(w.Body.String(), want) {
			b.Fatalf("%s: %d, not %q", path, w.Code, want)
		}
	}
	slices.Sort(times)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(times[len(times)/2]), "p50-ms")
	b.ReportMetric(ms(times[len(times)*99/100]), "p99-ms")
}

func benchInstancesPage(b *testing.B, c *Console, session *http.Cookie, n int, after200 string) {
	st := c.cfg.Store
	h := c.Handler()
	pages := []string{"/ui/instances", "/ui/instances?sort=verdict&dir=desc", "/ui/instances?verdict=untrusted&sort=evidence",
		after200, "/ui/instances?q=00000000-0000-4000-8000-0000000012"}
	// What each page must say, so that a page of nothing (an error page,
	// an empty table) fails the run rather than timing well.
	want := []string{fmt.Sprintf("Instances 1–%d of %d", PageSize, n), fmt.Sprintf("Instances 1–%d of %d", PageSize, n), "untrusted",
		fmt.Sprintf("Instances %d–%d of %d", n-PageSize+1, n, n), fmt.Sprintf("Instances 1–%d of 100", PageSize)}
	var times []time.Duration
	var first int
	b.ResetTimer()
	for b.Loop() {
		for i, p := range pages {
			w := httptest.NewRecorder()
			r := httptest.NewRequest("GET", p, nil)
			r.AddCookie(session)
			start := time.Now()
			h.ServeHTTP(w, r)
			times = append(times, time.Since(start))
			if w.Code != 200 || !strings.Contains(w.Body.String(), want[i]) {
				b.Fatalf("%s: %d, not %q", p, w.Code, want[i])
			}
			if i == 0 {
				first = w.Body.Len()
			}
		}
	}
	b.StopTimer()
	percentiles := func(ds []time.Duration) (time.Duration, time.Duration) {
		slices.Sort(ds)
		return ds[len(ds)/2], ds[len(ds)*99/100]
	}
	for i, p := range pages {
		var mine []time.Duration
		for j := i; j < len(times); j += len(pages) {
			mine = append(mine, times[j])
		}
		p50, p99 := percentiles(mine)
		b.Logf("%s: p50 %v p99 %v", p, p50, p99)
	}
	var counts []time.Duration
	for range 200 {
		err := st.View(context.Background(), func(tx *store.Tx) error {
			start := time.Now()
			_, err := tx.CountInstances(store.InstanceQuery{})
			counts = append(counts, time.Since(start))
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	p50, p99 := percentiles(counts)
	b.Logf("the count of all %d: p50 %v p99 %v", n, p50, p99)
	p50, p99 = percentiles(times)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(p50), "p50-ms")
	b.ReportMetric(ms(p99), "p99-ms")
	b.ReportMetric(float64(first)/1024, "first-page-KiB")
}

// fill stores n instances on 20 hosts with their attestations, nine in
// ten of them registered and judged by the shared policy gold.
func fill(b testing.TB, st *store.Store, n int) {
	b.Helper()
	ctx := context.Background()
	gold := &store.Policy{Name: "gold", PCRs: map[int][]byte{4: make([]byte, 32)}}
	err := st.Update(ctx, func(tx *store.Tx) error {
		if err := tx.CreatePolicy(gold); err != nil {
			return err
		}
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
				a := &store.Attestation{InstanceID: id, Verdict: verdict, PolicyName: gold.Name, PolicyID: gold.ID, RegisteredAt: now,
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
