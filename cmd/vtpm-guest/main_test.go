package main

import (
	"debug/elf"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestStaticBuild: `make build` makes a static vtpm-guest, which a guest
// image can carry without its libc: no program interpreter, no shared
// library needed.
func TestStaticBuild(t *testing.T) {
	bin := t.TempDir()
	if out, err := exec.Command("make", "-C", "../..", "build", "BIN="+bin).CombinedOutput(); err != nil {
		t.Fatalf("make build: %v\n%s", err, out)
	}
	f, err := elf.Open(filepath.Join(bin, "vtpm-guest"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("vtpm-guest has a program interpreter: it is dynamically linked")
		}
	}
	if libs, err := f.ImportedLibraries(); err != nil || len(libs) > 0 {
		t.Errorf("vtpm-guest needs shared libraries %v (%v)", libs, err)
	}
}
