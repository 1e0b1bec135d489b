// Package citest holds the one rule for tests that need a real component
// (swtpm, libvirtd, PostgreSQL, a tool, root): when it is missing the test
// is skipped on a developer's machine, and fails under CI=true, where
// make test has installed everything.
package citest

import (
	"os"
	"testing"
)

// Missing ends t because something it needs is missing, saying what: a
// skip, or a failure under CI=true.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf(format+"; CI=true requires it", args...)
		return
	}
	t.Skipf(format, args...)
}
