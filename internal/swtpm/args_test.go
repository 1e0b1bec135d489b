package swtpm

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/spec"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// TestArgsGolden pins swtpm's command line: a change to it changes how every
// vTPM runs, and libvirt compatibility (the --key form) depends on it.
func TestArgsGolden(t *testing.T) {
	for _, v := range []spec.Version{spec.V20, spec.V12} {
		i := Instance{Dir: "/var/lib/vtpmd/vtpm/0b1c", Version: v, Secret: []byte("never in argv")}
		got := strings.Join(i.args(), "\n") + "\n"
		if strings.Contains(got, string(i.Secret)) {
			t.Fatal("the secret is in argv")
		}
		golden := filepath.Join("testdata", "args-"+string(v)+".golden")
		if *update {
			if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		want, err := os.ReadFile(golden)
		if err != nil {
			t.Fatalf("%v (run go test -update)", err)
		}
		if got != string(want) {
			t.Errorf("swtpm argv for %s:\n%s\nwant:\n%s", v, got, want)
		}
	}
}

func TestCheckRejectsBadInstances(t *testing.T) {
	good := Instance{Dir: "/x", Version: spec.V20, Secret: []byte("s")}
	for name, i := range map[string]Instance{
		"no secret":   {Dir: "/x", Version: spec.V20},
		"long secret": {Dir: "/x", Version: spec.V20, Secret: make([]byte, maxSecret+1)},
		"comma":       {Dir: "/x,mode=0666", Version: spec.V20, Secret: []byte("s")},
		"no dir":      {Version: spec.V20, Secret: []byte("s")},
		"version":     {Dir: "/x", Version: "3.0", Secret: []byte("s")},
	} {
		if _, err := i.check(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := good.check(); err != nil {
		t.Fatal(err)
	}
}

func TestStoredCertHeader(t *testing.T) {
	der := []byte{0x30, 0x82, 0x01, 0x00}
	got := storedCert(der)
	want := []byte{0x10, 0x01, 0x00, 0x00, 0x06, 0x10, 0x02, 0x30, 0x82, 0x01, 0x00}
	if string(got) != string(want) {
		t.Fatalf("stored cert %x; want %x", got, want)
	}
}

func TestPCRBanks(t *testing.T) {
	if b, err := pcrBanks(nil); err != nil || len(b) != 1 {
		t.Fatalf("default banks %v, %v", b, err)
	}
	if b, err := pcrBanks([]string{"sha1", "sha256", "sha1"}); err != nil || len(b) != 2 {
		t.Fatalf("banks %v, %v", b, err)
	}
	if _, err := pcrBanks([]string{"md5"}); err == nil {
		t.Fatal("md5 bank accepted")
	}
}
