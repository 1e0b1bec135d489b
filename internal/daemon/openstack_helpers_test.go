package daemon

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/vtpmd/vtpmd/internal/keystone"
)

// TEMPORARY until internal/ostest lands: the state openstack-up.sh made.
const osClouds = "/var/lib/vtpmd-openstack/keystone/clouds.yaml"

type osCloud struct {
	Keystone, Barbican, Clouds string
	proxy                      *cutProxy
}

func osUp(t testing.TB) *osCloud {
	t.Helper()
	if _, err := os.Stat(osClouds); err != nil {
		t.Fatalf("keystone and barbican are not up (scripts/openstack-up.sh): %v", err)
	}
	p := newCutProxy(t, "127.0.0.1:9311")
	return &osCloud{Keystone: "http://127.0.0.1:5000/v3", Barbican: "http://" + p.addr, Clouds: osClouds, proxy: p}
}

func osToken(t testing.TB, cloud string) string {
	t.Helper()
	c, err := keystone.LoadCloud(osClouds, cloud)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := keystone.NewSession(c, nil).Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// serviceCredentials writes vtpmd's service user's cloud entry as a
// credentials file.
func serviceCredentials(t testing.TB, c *osCloud) string {
	t.Helper()
	data, err := os.ReadFile(c.Clouds)
	if err != nil {
		t.Fatal(err)
	}
	var clouds struct {
		Clouds map[string]any `yaml:"clouds"`
	}
	if err := yaml.Unmarshal(data, &clouds); err != nil {
		t.Fatal(err)
	}
	entry := clouds.Clouds["vtpmd"].(map[string]any)
	out, err := yaml.Marshal(map[string]any{"auth": entry["auth"], "region_name": entry["region_name"]})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "keystone.yaml")
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// stopBarbican makes Barbican unreachable to this test's daemon: new
// connections are refused.
func (c *osCloud) stopBarbican(t testing.TB) { c.proxy.ln.Close() }

// startBarbican makes it reachable again, on the same address.
func (c *osCloud) startBarbican(t testing.TB) {
	ln, err := net.Listen("tcp", c.proxy.addr)
	if err != nil {
		t.Fatal(err)
	}
	c.proxy.serve(ln)
	t.Cleanup(func() { ln.Close() })
}

type cutProxy struct {
	addr, target string
	ln           net.Listener
}

func newCutProxy(t testing.TB, target string) *cutProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{addr: ln.Addr().String(), target: target}
	p.serve(ln)
	t.Cleanup(func() { ln.Close() })
	return p
}

func (p *cutProxy) serve(ln net.Listener) {
	p.ln = ln
	target := p.target
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				go io.Copy(u, c)
				io.Copy(c, u)
			}()
		}
	}()
}
