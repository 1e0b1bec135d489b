package server

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/store"
)

type metrics struct {
	reg      *prometheus.Registry
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
}

// newMetrics registers the API's metrics in reg; phases counts the vTPMs
// in each phase at scrape time, swept the abandoned transfers this process
// removed, statements (if not nil) the store's SQL statements so far, logs
// (if not nil) the verifier's cache of parsed event logs.
func newMetrics(reg *prometheus.Registry, phases func(context.Context) (map[store.Phase]int, error), swept func() int64, st StoreStats, logs func() attest.LogCacheStats) *metrics {
	m := &metrics{
		reg: reg,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vtpmd_http_requests_total", Help: "API requests by route and status code.",
		}, []string{"route", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "vtpmd_http_request_duration_seconds", Help: "API request latency by route.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}, []string{"route"}),
	}
	reg.MustRegister(m.requests, m.latency, &phaseCollector{phases}, prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "vtpmd_state_transfers_swept_total", Help: "Requests to hosts' agents (exports, imports, moves' steps) that this server removed as abandoned: asked long ago, awaited by no server.",
	}, func() float64 { return float64(swept()) }))
	if st != nil {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "vtpmd_store_statements_total", Help: "SQL statements run by the store's transactions (BEGIN and COMMIT not counted).",
		}, func() float64 { return float64(st.Statements()) }), prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "vtpmd_store_retries_total", Help: "Transactions run again because another won a serialization conflict (PostgreSQL).",
		}, func() float64 { return float64(st.Retries()) }))
	}
	if logs != nil {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "vtpmd_event_log_cache_hits_total", Help: "Evidence whose firmware event log the verifier had parsed and replayed before (for any instance).",
		}, func() float64 { return float64(logs().Hits) }), prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "vtpmd_event_log_cache_misses_total", Help: "Evidence whose firmware event log the verifier parsed and replayed anew.",
		}, func() float64 { return float64(logs().Misses) }), prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "vtpmd_event_log_cache_bytes", Help: "Memory the verifier's parsed event logs take (bounded).",
		}, func() float64 { return float64(logs().Bytes) }))
	}
	return m
}

// StoreStats are the store's counters (*store.Store).
type StoreStats interface {
	Statements() int64
	Retries() int64
}

func (m *metrics) handler() http.Handler { return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}) }

func (m *metrics) instrument(route string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		h.ServeHTTP(sw, r)
		m.requests.WithLabelValues(route, strconv.Itoa(sw.code)).Inc()
		// A long poll takes as long as it waits; it would bury the
		// latency of everything else in the top buckets.
		if !r.URL.Query().Has("wait") {
			m.latency.WithLabelValues(route).Observe(time.Since(start).Seconds())
		}
	})
}

type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}

// phaseCollector reports how many vTPMs are in each phase, read from the
// store at scrape time so it is never out of step.
type phaseCollector struct {
	phases func(context.Context) (map[store.Phase]int, error)
}

var phaseDesc = prometheus.NewDesc("vtpmd_vtpms", "vTPMs by phase.", []string{"phase"}, nil)

func (c *phaseCollector) Describe(ch chan<- *prometheus.Desc) { ch <- phaseDesc }

func (c *phaseCollector) Collect(ch chan<- prometheus.Metric) {
	counts, err := c.phases(context.Background()) // a scrape has no context
	if err != nil {
		ch <- prometheus.NewInvalidMetric(phaseDesc, err)
		return
	}
	for _, p := range []store.Phase{store.PhasePending, store.PhaseProvisioning, store.PhaseActive, store.PhaseStopped, store.PhaseDeleting, store.PhaseError} {
		ch <- prometheus.MustNewConstMetric(phaseDesc, prometheus.GaugeValue, float64(counts[p]), string(p))
	}
}
