package daemon

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// serveHandshakes serves a handler answering "ok" over HTTPS on
// listenTLS, as the API does, with state called as each connection's
// state changes; it returns the server's address, a client trusting it
// (HTTP/2, as hosts' agents are) and the server's log.
func serveHandshakes(t *testing.T, state func(net.Conn, http.ConnState)) (addr string, c *http.Client, log *syncBuffer) {
	t.Helper()
	dir := t.TempDir()
	_, certFile, keyFile := writeTestPKI(t, dir)
	log = &syncBuffer{}
	logger := slog.New(slog.NewTextHandler(log, nil))
	serving, self, err := tlsConfigs(certFile, keyFile, logger)
	if err != nil {
		t.Fatal(err)
	}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }),
		TLSConfig: serving, ConnState: state, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(listenTLS(inner, serving, logger)) }()
	t.Cleanup(func() {
		if err := srv.Shutdown(context.Background()); err != nil {
			t.Error(err)
		}
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve after Shutdown: %v", err)
		}
	})
	tr := &http.Transport{TLSClientConfig: self, ForceAttemptHTTP2: true}
	t.Cleanup(tr.CloseIdleConnections)
	return inner.Addr().String(), &http.Client{Transport: tr, Timeout: time.Minute}, log
}

// TestHandshakesBeforeServing: http.Server gets each connection with its
// TLS handshake done (so the goroutine that serves it never ran one), and
// serves HTTP/2 on it.
func TestHandshakesBeforeServing(t *testing.T) {
	var mu sync.Mutex
	var states []bool
	addr, c, _ := serveHandshakes(t, func(conn net.Conn, s http.ConnState) {
		if s == http.StateNew {
			mu.Lock()
			defer mu.Unlock()
			states = append(states, conn.(*tls.Conn).ConnectionState().HandshakeComplete)
		}
	})
	resp, err := c.Get("https://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.Proto != "HTTP/2.0" || string(body) != "ok" {
		t.Fatalf("%s %q", resp.Proto, body)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(states) != 1 || !states[0] {
		t.Fatalf("handshake complete when served: %v", states)
	}
}

// TestHandshakeStallsNoOne: a client that connects and never says a word
// holds up no other client's handshake.
func TestHandshakeStallsNoOne(t *testing.T) {
	addr, c, _ := serveHandshakes(t, nil)
	silent, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	resp, err := c.Get("https://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatal(resp.Status)
	}
	// Answered while the silent client's handshake still waits (for up
	// to handshakeTimeout), not after it gave up on it.
	silent.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := silent.Read(make([]byte, 1)); !isTimeout(err) {
		t.Fatalf("the silent client's connection: %v, want it still open", err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestHandshakePlainHTTP: a client speaking plain HTTP to the TLS port is
// told so, and the failure is logged.
func TestHandshakePlainHTTP(t *testing.T) {
	addr, _, log := serveHandshakes(t, nil)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	answer, err := io.ReadAll(conn)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(answer), "HTTP/1.0 400 Bad Request") || !strings.Contains(string(answer), "HTTP request to an HTTPS server") {
		t.Fatalf("%q", answer)
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(log.String(), "TLS handshake failed"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("log: %q", log.String())
		}
	}
	if !strings.Contains(log.String(), "client sent an HTTP request to an HTTPS server") {
		t.Fatalf("log: %q", log.String())
	}
}

// syncBuffer is a bytes.Buffer safe for a logger and a test at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
