package keystone

import (
	"os"
	"testing"

	"github.com/vtpmd/vtpmd/internal/citest"
)

// TEMPORARY until the shared test package lands.
func keystoneCloud(t testing.TB, name string) Credentials {
	t.Helper()
	const f = "/var/lib/vtpmd-openstack/keystone/clouds.yaml"
	if _, err := os.Stat(f); err != nil {
		citest.Missing(t, "no Keystone: scripts/openstack-up.sh brings one up")
	}
	c, err := LoadCloud(f, name)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
