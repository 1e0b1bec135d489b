package citest

import "testing"

// recorder notes Skipf and Fatalf instead of ending the test.
type recorder struct {
	testing.TB
	skipped, failed bool
}

func (r *recorder) Helper()               {}
func (r *recorder) Skipf(string, ...any)  { r.skipped = true }
func (r *recorder) Fatalf(string, ...any) { r.failed = true }

func TestMissingSkipsUnlessCI(t *testing.T) {
	t.Setenv("CI", "")
	r := &recorder{TB: t}
	Missing(r, "swtpm is not on PATH")
	if !r.skipped || r.failed {
		t.Fatalf("without CI: skipped %v, failed %v; want a skip", r.skipped, r.failed)
	}
	t.Setenv("CI", "true")
	r = &recorder{TB: t}
	Missing(r, "swtpm is not on PATH")
	if r.skipped || !r.failed {
		t.Fatalf("CI=true: skipped %v, failed %v; want a failure", r.skipped, r.failed)
	}
}
