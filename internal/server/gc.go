package server

import (
	"os"
	"runtime/debug"
)

// GCPercent is the garbage collector's target (GOGC) a vtpmd process runs
// with unless its environment sets GOGC. A server's live heap is small (a
// few MiB) next to what its requests allocate (≈40 KiB a key release), so
// at Go's default of 100 it collects tens of times a second under load,
// and those collections (their CPU and the allocation assists they charge
// requests) were most of the release latency's 99th percentile in
// BenchmarkRelease. At 400 the heap grows to five times what is live
// before a collection: a few MiB more memory, a quarter of the
// collections.
const GCPercent = 400

// TuneGC sets GCPercent unless the environment chose (GOGC).
func TuneGC() {
	if _, set := os.LookupEnv("GOGC"); !set {
		debug.SetGCPercent(GCPercent)
	}
}
