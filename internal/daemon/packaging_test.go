package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The example configurations shipped in packaging/config are files vtpmd
// reads as the role each is named after: every key is a setting of that
// role, given once, with a value of its type, and the configuration they
// make is valid.
func TestPackagedConfigs(t *testing.T) {
	files, err := filepath.Glob("../../packaging/config/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no example configurations in packaging/config (%v)", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			role := Role(strings.TrimSuffix(filepath.Base(file), ".yaml")) // server.yaml is vtpmd server's
			if _, err := ParseRole(string(role)); err != nil {
				t.Fatalf("%s: name the file after its role: %v", file, err)
			}
			c, err := ParseConfig(data, role)
			if err != nil {
				t.Fatalf("%s: %v", file, err)
			}
			// The accounts named are the target host's, not this one's.
			c.SwtpmUser, c.SwtpmGroup, c.SocketGroup = "", "", ""
			c.Defaults()
			if err := c.ValidateRole(role); err != nil {
				t.Errorf("%s: %v", file, err)
			}
		})
	}
}
