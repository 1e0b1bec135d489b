package libvirt

import (
	"fmt"
	"os"
	"os/user"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/spec"
)

const swtpmBoth = `{"type": "swtpm", "features": ["tpm-1.2", "tpm-2.0", "cmdarg-pwd-fd"], "version": "0.7.1"}`

func TestHostCapabilities(t *testing.T) {
	raw, err := os.ReadFile("testdata/domcaps-q35-libvirt9.xml") // virsh domcapabilities, libvirt 9.0
	if err != nil {
		t.Fatal(err)
	}
	real := string(raw)
	edit := func(old, new string) string {
		if !strings.Contains(real, old) {
			t.Fatalf("sample lacks %q", old)
		}
		return strings.Replace(real, old, new, 1)
	}
	noVersions := edit("<enum name='backendVersion'>\n        <value>1.2</value>\n        <value>2.0</value>\n      </enum>", "")
	for _, c := range []struct {
		name, domcaps, swtpm string
		mode                 Mode
		want                 string // fmt of Versions and Models, or the error's gist
	}{
		{"libvirt 9, emulator", real, swtpmBoth, Emulator, "[1.2 2.0] [tpm-tis tpm-crb]"},
		{"libvirt 9, external", real, swtpmBoth, External, "[1.2 2.0] [tpm-tis tpm-crb]"},
		{"no versions listed: both", noVersions, swtpmBoth, Emulator, "[1.2 2.0] [tpm-tis tpm-crb]"},
		{"swtpm without 1.2", real, `{"features": ["tpm-2.0"]}`, Emulator, "[2.0] [tpm-tis tpm-crb]"},
		{"TIS only", edit("<value>tpm-crb</value>", ""), swtpmBoth, Emulator, "[1.2 2.0] [tpm-tis]"},
		{"TPM unsupported", edit("<tpm supported='yes'>", "<tpm supported='no'>"), swtpmBoth, Emulator, "error: no TPM device support"},
		{"no external backend", edit("<value>external</value>", ""), swtpmBoth, External, "error: in external mode"},
		{"no emulator backend", edit("<value>emulator</value>", ""), swtpmBoth, Emulator, "error: in emulator mode"},
		{"no shared version", noVersions, `{"features": []}`, Emulator, "error: share no TPM version"},
		{"bad swtpm output", real, `not json`, Emulator, "error: parsing swtpm"},
		{"bad domcaps", "<domainCapabilities", swtpmBoth, Emulator, "error: parsing libvirt"},
	} {
		t.Run(c.name, func(t *testing.T) {
			caps, err := HostCapabilities(c.domcaps, []byte(c.swtpm), c.mode)
			got := fmt.Sprint(caps.Versions, " ", caps.Models)
			if err != nil {
				got = "error: " + err.Error()
			}
			if !strings.HasPrefix(c.want, "error: ") && got != c.want || strings.HasPrefix(c.want, "error: ") && !strings.Contains(got, strings.TrimPrefix(c.want, "error: ")) {
				t.Fatalf("got %q, want %q", got, c.want)
			}
			if err == nil && (!caps.Enabled || !spec.HostTraits(caps).Has("COMPUTE_SECURITY_TPM_2_0") && strings.Contains(c.want, "2.0")) {
				t.Fatalf("traits of %+v", caps)
			}
		})
	}
}

func TestQEMUGroup(t *testing.T) {
	nogroup, err := user.LookupGroup("nogroup")
	if err != nil {
		t.Fatal(err)
	}
	caps := func(labels ...string) string {
		x := "<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel><secmodel><model>dac</model><doi>0</doi>"
		for i, l := range labels {
			x += fmt.Sprintf("<baselabel type='%s'>%s</baselabel>", []string{"kvm", "qemu"}[i], l)
		}
		return x + "</secmodel></host></capabilities>"
	}
	for _, c := range []struct {
		caps, want, err string
	}{
		{caps("+1:+"+nogroup.Gid, "+1:+"+nogroup.Gid), "nogroup", ""}, // as libvirt 9 writes it
		{caps("libvirt-qemu:nogroup"), "nogroup", ""},
		{caps("+0:+0", "+0:+0"), "", ""}, // QEMU as root: nothing to allow
		{"<capabilities><host><secmodel><model>selinux</model><doi>0</doi><baselabel type='kvm'>system_u:system_r:svirt_t:s0</baselabel></secmodel></host></capabilities>", "", ""},
		{caps("+1:+"+nogroup.Gid, "+1:+0"), "", "several groups"},
		{caps("+1:+4294967"), "", "group libvirt runs QEMU as"},
		{"<capabilities", "", "capabilities"},
	} {
		got, err := qemuGroup(c.caps)
		if got != c.want || (err == nil) != (c.err == "") || err != nil && !strings.Contains(err.Error(), c.err) {
			t.Errorf("%s: %q, %v; want %q, %q", c.caps, got, err, c.want, c.err)
		}
	}
}
