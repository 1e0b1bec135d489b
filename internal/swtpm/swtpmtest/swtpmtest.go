// Package swtpmtest holds test helpers for code that runs real swtpm.
package swtpmtest

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Require skips the test when swtpm (and the named extra tools) are not
// installed, except under CI=true, where a missing component fails it: a
// green CI must mean the real thing ran.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range append([]string{"swtpm"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is not installed (run make deps); CI=true requires it", tool)
			}
			t.Skipf("%s is not installed (run make deps)", tool)
		}
	}
}

// CheckNoProcesses fails if any swtpm process still serves a directory
// under root.
func CheckNoProcesses(t testing.TB, root string) {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		if bytes.Contains(b, []byte("swtpm")) && bytes.Contains(b, []byte(root)) {
			t.Errorf("swtpm leaked: %s", bytes.ReplaceAll(b, []byte{0}, []byte(" ")))
		}
	}
}
