package server

import (
	"context"
	"sync"
	"testing"

	"github.com/vtpmd/vtpmd/internal/keystone"
	"github.com/vtpmd/vtpmd/internal/ostest"
)

// keystoneCloud is a cloud of the real Keystone scripts/openstack-up.sh
// brings up, read as vtpmd reads clouds.yaml.
func keystoneCloud(t *testing.T, name string) keystone.Credentials {
	t.Helper()
	c, err := keystone.LoadCloud(ostest.Up(t).CloudsFile, name)
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
