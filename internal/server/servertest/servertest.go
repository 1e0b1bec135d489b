// Package servertest serves vtpmd's API in tests the way vtpmd does for its
// operator: on a unix socket where every connection is the operator's.
package servertest

import (
	"context"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/server"
)

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
