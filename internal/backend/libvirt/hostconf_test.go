package libvirt

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

func TestConfigureQEMUConf(t *testing.T) {
	debian, err := os.ReadFile("testdata/qemu.conf")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, in, want string
		changes        int
	}{
		{"after the commented defaults", string(debian),
			strings.Replace(strings.Replace(string(debian), "#swtpm_user = \"tss\"\n", "#swtpm_user = \"tss\"\nswtpm_user = \"swtpm\"\n", 1),
				"#swtpm_group = \"tss\"\n", "#swtpm_group = \"tss\"\nswtpm_group = \"kvm\"\n", 1), 2},
		{"replaced in place", "a = 1\nswtpm_user = \"tss\"\n  swtpm_group=\"tss\"  \nb = 2\n",
			"a = 1\nswtpm_user = \"swtpm\"\nswtpm_group = \"kvm\"\nb = 2\n", 2},
		{"already set", "swtpm_user = \"swtpm\"\nswtpm_group = \"kvm\"\n", "swtpm_user = \"swtpm\"\nswtpm_group = \"kvm\"\n", 0},
		{"appended, no final newline", "user = \"root\"", "user = \"root\"\nswtpm_user = \"swtpm\"\nswtpm_group = \"kvm\"\n", 2},
		{"empty file", "", "swtpm_user = \"swtpm\"\nswtpm_group = \"kvm\"\n", 2},
		{"one of two set", "swtpm_group = \"kvm\"\n", "swtpm_group = \"kvm\"\nswtpm_user = \"swtpm\"\n", 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, changes, err := ConfigureQEMUConf([]byte(c.in), "swtpm", "kvm")
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != c.want || len(changes) != c.changes {
				t.Fatalf("got %d changes %q:\n%s\nwant %d:\n%s", len(changes), changes, got, c.changes, c.want)
			}
			again, changes, err := ConfigureQEMUConf(got, "swtpm", "kvm")
			if err != nil || !bytes.Equal(again, got) || len(changes) != 0 {
				t.Fatalf("second run changed %q (%v)", changes, err)
			}
		})
	}
	for _, bad := range [][2]string{{"", "kvm"}, {"a\"b", "kvm"}, {"swtpm", "k\nvm"}, {"swtpm", "0group"}} {
		if _, _, err := ConfigureQEMUConf(debian, bad[0], bad[1]); err == nil {
			t.Fatalf("%q:%q accepted", bad[0], bad[1])
		}
	}
}
