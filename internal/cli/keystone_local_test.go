package cli

import (
	"os"
	"testing"

	"github.com/vtpmd/vtpmd/internal/citest"
)

// TEMPORARY until the shared test package lands.
func keystoneClouds(t *testing.T) string {
	const f = "/var/lib/vtpmd-openstack/keystone/clouds.yaml"
	if _, err := os.Stat(f); err != nil {
		citest.Missing(t, "no Keystone: scripts/openstack-up.sh brings one up")
	}
	return f
}
