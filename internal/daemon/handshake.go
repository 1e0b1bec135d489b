package daemon

import (
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// handshakeTimeout bounds a TLS handshake, as http.Server bounds it by its
// ReadHeaderTimeout.
const handshakeTimeout = 10 * time.Second

// handshakes is a TLS listener that hands http.Server connections whose
// handshake is done, each handshake run on a goroutine of its own that
// ends with it.
//
// http.Server runs the handshake on the goroutine that then serves the
// connection, and an HTTP/2 connection's serving goroutine parks for the
// connection's life: every connected agent's would keep the stack the
// handshake grew it to (16 KiB, where serving needs 8), since the runtime
// halves a parked goroutine's stack only while it uses under a quarter of
// it. A handshake's own goroutine gives its stack back when it ends.
//
// A failed handshake is logged and its connection closed; a client that
// speaks plain HTTP is told so, as http.Server tells it.
type handshakes struct {
	inner  net.Listener
	config *tls.Config
	log    *slog.Logger

	ready   chan net.Conn // handshaken connections
	failed  chan error    // the inner listener's errors
	closed  chan struct{}
	closing sync.Once
}

var _ net.Listener = (*handshakes)(nil)

// listenTLS serves TLS on inner with config (its NextProtos name the
// protocols to offer), handshaking as handshakes says.
func listenTLS(inner net.Listener, config *tls.Config, log *slog.Logger) net.Listener {
	l := &handshakes{inner: inner, config: config, log: log,
		ready: make(chan net.Conn), failed: make(chan error), closed: make(chan struct{})}
	go l.accept()
	return l
}

// accept takes connections from the inner listener until it is closed,
// each to a handshake of its own; an error goes to Accept's caller
// (http.Server retries a temporary one after a pause, and is blocked on
// here meanwhile).
func (l *handshakes) accept() {
	for {
		c, err := l.inner.Accept()
		if err != nil {
			select {
			case l.failed <- err:
			case <-l.closed:
				return
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		go l.handshake(c)
	}
}

func (l *handshakes) handshake(c net.Conn) {
	tc := tls.Server(c, l.config)
	c.SetDeadline(time.Now().Add(handshakeTimeout))
	if err := tc.Handshake(); err != nil {
		reason := err.Error()
		if re, ok := err.(tls.RecordHeaderError); ok && re.Conn != nil && looksLikeHTTP(re.RecordHeader) {
			io.WriteString(re.Conn, "HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
			reason = "client sent an HTTP request to an HTTPS server"
		}
		c.Close()
		l.log.Warn("TLS handshake failed", "remote", c.RemoteAddr().String(), "err", reason)
		return
	}
	c.SetDeadline(time.Time{})
	select {
	case l.ready <- tc:
	case <-l.closed:
		tc.Close()
	}
}

// looksLikeHTTP reports whether a TLS record header is the start of a
// plain HTTP request.
func looksLikeHTTP(hdr [5]byte) bool {
	switch string(hdr[:]) {
	case "GET /", "HEAD ", "POST ", "PUT /", "OPTIO":
		return true
	}
	return false
}

// Accept returns the next handshaken connection.
func (l *handshakes) Accept() (net.Conn, error) {
	select {
	case c := <-l.ready:
		return c, nil
	case err := <-l.failed:
		return nil, err
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

// Close stops accepting; handshakes under way close their connections.
func (l *handshakes) Close() error {
	err := net.ErrClosed
	l.closing.Do(func() {
		close(l.closed)
		err = l.inner.Close()
	})
	return err
}

func (l *handshakes) Addr() net.Addr { return l.inner.Addr() }
