// Package servertest serves vtpmd's API in tests the way vtpmd does: the
// domain packages assembled over a store and a key manager, and the
// operator's API on a unix socket where every connection is the
// operator's.
package servertest

import (
	"context"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
	"github.com/vtpmd/vtpmd/internal/broker"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/console"
	"github.com/vtpmd/vtpmd/internal/enrol"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/secrets"
	"github.com/vtpmd/vtpmd/internal/server"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
)

// New assembles the API over st and kr as vtpmd does, with no host agent
// running (records stay pending, drift checks go unanswered), no verdict signing and no webhook, an empty CA
// chain, a host CA of its own, and the web console with a fixed key.
func New(t testing.TB, st *store.Store, kr keyring.Keyring) *server.Server {
	t.Helper()
	caChain := func() []byte { return nil }
	hostCA, err := ca.New(ca.Options{CommonName: ca.HostCommonName})
	if err != nil {
		t.Fatal(err)
	}
	keys := secrets.New(st, kr, nil)
	vs := vtpms.New(vtpms.Config{Store: st, Keyring: kr, Secrets: keys})
	ver := verifier.New(verifier.Config{Store: st, VTPMs: vs, CAChainPEM: caChain})
	api := &server.Server{VTPMs: vs, Verifier: ver, Secrets: keys, CAChainPEM: caChain,
		Broker:    broker.New(broker.Config{Store: st, Keyring: kr, Verifier: ver}),
		Enrolment: enrol.New(enrol.Config{Store: st, HostCA: hostCA}), Agents: agentstore.New(st, kr, nil, nil)}
	api.Console = console.New(console.Config{Store: st, VTPMs: vs, Verifier: ver, Authenticate: api.BrowserViewer})
	return api
}

// Operator serves h on a fresh unix socket as the operator's local API and
// returns its URL (unix://PATH, which client.New takes); the server stops
// when the test ends.
func Operator(t testing.TB, h http.Handler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ConnContext: server.OperatorConn, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	return "unix://" + path
}
