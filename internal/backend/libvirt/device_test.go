package libvirt

import (
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/spec"
)

var update = flag.Bool("update", false, "rewrite the golden files")

const (
	testSecret   = "3c2b8e0a-54f1-4a7e-9d0b-6f3e2a1c9b84"
	testInstance = "7d7a0c4e-8f4b-4bd2-9d6e-2b8f4f3c1a10"
	testSocket   = "/var/lib/vtpmd/vtpms/" + testInstance + "/tpm.sock.ctrl"
)

// golden compares got with testdata/name (rewritten with -update) and has
// libvirt's own schema validate it.
func golden(t *testing.T, name, got, schema string) {
	t.Helper()
	path := filepath.Join("testdata", "golden", name)
	if *update {
		os.MkdirAll(filepath.Dir(path), 0o755)
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Fatalf("%s differs from the golden file:\n--- got\n%s\n--- want\n%s", name, got, want)
	}
	validate(t, path, schema)
}

// validate runs virt-xml-validate (libvirt's RelaxNG schemas) on path.
func validate(t *testing.T, path, schema string) {
	t.Helper()
	if _, err := exec.LookPath("virt-xml-validate"); err != nil {
		citest.Missing(t, "virt-xml-validate is missing (scripts/libvirtd-up.sh installs libvirt-clients)")
	}
	if out, err := exec.Command("virt-xml-validate", path, schema).CombinedOutput(); err != nil {
		t.Fatalf("libvirt's %s schema refuses %s: %v\n%s", schema, path, err, out)
	}
}

// TestDeviceGolden covers every TPM device shape, each inside the same
// domain, whose other elements must come through untouched.
func TestDeviceGolden(t *testing.T) {
	base, err := os.ReadFile("testdata/domain.xml")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		spec spec.Spec
		mode Mode
	}{
		{"emulator-1.2-tis", spec.Spec{Version: spec.V12, Model: spec.TIS}, Emulator},
		{"emulator-2.0-tis", spec.Spec{Version: spec.V20, Model: spec.TIS}, Emulator},
		{"emulator-2.0-crb", spec.Spec{Version: spec.V20, Model: spec.CRB}, Emulator},
		{"external-2.0-crb", spec.Spec{Version: spec.V20, Model: spec.CRB}, External},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := AttachTPM(string(base), TPMDevice(c.spec, c.mode, testSecret, testSocket))
			if err != nil {
				t.Fatal(err)
			}
			golden(t, c.name+".xml", got, "domain")
			var d libvirtxml.Domain
			if err := d.Unmarshal(got); err != nil {
				t.Fatal(err)
			}
			if len(d.Devices.TPMs) != 1 || d.Description != "kept as it is" || len(d.Devices.RNGs) != 1 || len(d.Devices.Serials) != 1 ||
				d.OS.NVRam == nil || d.Features == nil || d.Features.ACPI == nil {
				t.Fatalf("the rest of the domain did not come through: %+v", d)
			}
			// Attaching again changes nothing.
			again, err := AttachTPM(got, TPMDevice(c.spec, c.mode, testSecret, testSocket))
			if err != nil || again != got {
				t.Fatalf("attaching twice changed the domain (%v)", err)
			}
			detached, had, err := DetachTPM(got)
			if err != nil || !had || strings.Contains(detached, "<tpm") || !strings.Contains(detached, "<rng") {
				t.Fatalf("detach: had %v, err %v:\n%s", had, err, detached)
			}
		})
	}
}

// TestSecretGolden covers the libvirt secret of each secret-security mode:
// user and deployment ephemeral and private, host neither (as Nova).
func TestSecretGolden(t *testing.T) {
	for _, c := range []struct {
		mode spec.SecretSecurity
		keep bool
	}{{spec.User, false}, {spec.Deployment, false}, {spec.HostMode, true}} {
		t.Run(string(c.mode), func(t *testing.T) {
			got, err := SecretXML(testSecret, !c.keep, !c.keep, testInstance)
			if err != nil {
				t.Fatal(err)
			}
			golden(t, "secret-"+string(c.mode)+".xml", got, "secret")
		})
	}
}

func TestDetachWithoutTPM(t *testing.T) {
	base, _ := os.ReadFile("testdata/domain.xml")
	once, had, err := DetachTPM(string(base))
	if err != nil || !had {
		t.Fatalf("first detach: %v %v", had, err)
	}
	twice, had, err := DetachTPM(once)
	if err != nil || had || twice != once {
		t.Fatalf("detaching a domain without TPM changed it (%v %v)", had, err)
	}
	if _, err := AttachTPM("<domain", TPMDevice(spec.Spec{Version: spec.V20}, Emulator, testSecret, "")); err == nil {
		t.Fatal("malformed domain XML accepted")
	}
}
