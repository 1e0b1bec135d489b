package agent_test

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/vtpmd/vtpmd/"

// imports lists the packages of this module that the package in dir
// (relative to the module's root) imports, leaving out its tests.
func imports(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join("..", "..", dir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
			continue
		}
		f, err := parser.ParseFile(token.NewFileSet(), filepath.Join("..", "..", dir, e.Name()), nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range f.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			if p, ok := strings.CutPrefix(path, module); ok {
				out = append(out, p)
			}
		}
	}
	return out
}

// deps is every package of this module that the package in dir needs,
// directly or through others, each with the package that imports it.
func deps(t *testing.T, dir string) map[string]string {
	t.Helper()
	seen := map[string]string{}
	var walk func(string)
	walk = func(p string) {
		for _, d := range imports(t, p) {
			if _, ok := seen[d]; !ok {
				seen[d] = p
				walk(d)
			}
		}
	}
	walk(dir)
	return seen
}

// TestDependencies: the agent, every backend and the host's swtpm runtime
// know the control plane only through agent.Records, so none of them
// needs the store, directly or through another package (agentstore, which
// implements Records over the store, is the one that does); and the
// libvirt backend runs swtpm through the runtime, not through the swtpm
// backend.
func TestDependencies(t *testing.T) {
	pkgs := []string{"internal/agent", "internal/swtpm/swtpmhost"}
	backends, err := filepath.Glob(filepath.Join("..", "..", "internal", "backend", "*"))
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range backends {
		pkgs = append(pkgs, filepath.ToSlash(strings.TrimPrefix(b, filepath.Join("..", "..")+string(filepath.Separator))))
	}
	if len(pkgs) < 6 {
		t.Fatalf("found only %v", pkgs)
	}
	for _, p := range pkgs {
		d := deps(t, p)
		if by, ok := d["internal/store"]; ok {
			t.Errorf("%s needs internal/store (imported by %s)", p, by)
		}
		if by, ok := d["internal/backend/direct"]; ok && p != "internal/backend/direct" {
			t.Errorf("%s needs the swtpm backend (imported by %s)", p, by)
		}
	}
	if _, ok := deps(t, "internal/backend/libvirt")["internal/swtpm/swtpmhost"]; !ok {
		t.Error("the libvirt backend does not use the host's swtpm runtime")
	}
}
