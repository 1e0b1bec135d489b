package server

import (
	"context"
	"os"
	"sync"
	"testing"

	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/keystone"
)

// TEMPORARY until ostest lands.
const cloudsFile = "/var/lib/vtpmd-openstack/keystone/clouds.yaml"

func keystoneCloud(t *testing.T, name string) keystone.Credentials {
	t.Helper()
	if _, err := os.Stat(cloudsFile); err != nil {
		citest.Missing(t, "no Keystone: scripts/openstack-up.sh brings one up")
	}
	c, err := keystone.LoadCloud(cloudsFile, name)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var tokens sync.Map

func keystoneToken(t *testing.T, name string) string {
	if v, ok := tokens.Load(name); ok {
		return v.(string)
	}
	tok := freshToken(t, name)
	tokens.Store(name, tok)
	return tok
}

func freshToken(t *testing.T, name string) string {
	t.Helper()
	tok, err := keystone.NewSession(keystoneCloud(t, name), nil).Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}
