package hyperv

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func TestPlanGolden(t *testing.T) {
	base := Plan{InstanceID: "3f1e0a52-7c1b-4d25-9a5e-0c7d2b9e4a11", VMName: "instance-0000002a", Host: "hv-01", Server: "https://vtpmd.example:8780"}
	withKeys := base
	withKeys.Keys = []string{"6a0e5c7e-1111-4a4a-9b9b-000000000001", "6a0e5c7e-1111-4a4a-9b9b-000000000002"}
	hgs := withKeys
	hgs.Keys, hgs.HGS, hgs.TokenFile = withKeys.Keys[:1], "https://hgs.example/", `D:\vtpmd\token`
	for name, p := range map[string]Plan{"local-no-keys.ps1": base, "local-owner-guardian.ps1": withKeys, "hgs.ps1": hgs} {
		got := []byte(p.Script())
		path := filepath.Join("testdata", name)
		if *update {
			os.WriteFile(path, got, 0o644)
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%v (run go test -update to create it)", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from the golden file:\n%s", name, got)
		}
	}
}

// A value cannot end its literal early: a quote in a VM name is doubled.
func TestQuote(t *testing.T) {
	for in, want := range map[string]string{
		"plain":                "'plain'",
		"it's":                 "'it''s'",
		"x'; Remove-Item C:\\": "'x''; Remove-Item C:\\'",
		"typo’graphic":         "'typo’’graphic'",
		"$(evil) `n":           "'$(evil) `n'",
	} {
		if got := quote(in); got != want {
			t.Errorf("quote(%q) = %s, want %s", in, got, want)
		}
	}
	s := Plan{VMName: "a'b"}.Script()
	if !strings.Contains(s, "param([string]$VMName = 'a''b')") {
		t.Fatalf("VM name not quoted:\n%s", s)
	}
}
