package keystone

import (
	"testing"

	"github.com/vtpmd/vtpmd/internal/ostest"
)

// keystoneCloud is a cloud of the real Keystone scripts/openstack-up.sh
// brings up, read as vtpmd reads clouds.yaml.
func keystoneCloud(t testing.TB, name string) Credentials {
	t.Helper()
	c, err := LoadCloud(ostest.Up(t).CloudsFile, name)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
