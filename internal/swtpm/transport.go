package swtpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
)

// Dial connects to a TPM's data socket (Instance.DataSocket) and returns a
// go-tpm transport that frames responses by their size field and re-sends
// commands answered with TPM_RC_RETRY. ctx bounds the whole connection: its
// deadline and cancellation interrupt a command in flight. swtpm serves one
// data connection at a time; others wait until it is closed.
//
// It works for TPM 1.2 too (raw commands through Send).
func Dial(ctx context.Context, socket string) (transport.TPMCloser, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("connecting to TPM: %w", err)
	}
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	c := &streamTPM{conn: conn, ctx: ctx, stop: stop}
	return closer{Retrying(c), c}, nil
}

type closer struct {
	transport.TPM
	io.Closer
}

// maxResponse bounds a TPM response (swtpm's buffer is 4 KiB; libtpms
// allows at most 64 KiB).
const maxResponse = 64 << 10

// streamTPM sends TPM commands over a stream connection.
type streamTPM struct {
	mu   sync.Mutex
	conn net.Conn
	ctx  context.Context
	stop func() bool
}

// Send writes cmd and reads exactly one response: the 10-byte header, then
// as many bytes as its size field says (TPM 2.0 and 1.2 share this layout).
func (t *streamTPM) Send(cmd []byte) ([]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, err := t.conn.Write(cmd); err != nil {
		return nil, fmt.Errorf("sending TPM command: %w", t.err(err))
	}
	rsp := make([]byte, 10, 1024)
	if _, err := io.ReadFull(t.conn, rsp); err != nil {
		return nil, fmt.Errorf("reading TPM response: %w", t.err(err))
	}
	size := int(binary.BigEndian.Uint32(rsp[2:6]))
	if size < 10 || size > maxResponse {
		return nil, fmt.Errorf("TPM response of %d bytes", size)
	}
	rsp = append(rsp, make([]byte, size-10)...)
	if _, err := io.ReadFull(t.conn, rsp[10:]); err != nil {
		return nil, fmt.Errorf("reading TPM response: %w", t.err(err))
	}
	return rsp, nil
}

// err reports a timeout that ctx caused as ctx's error.
func (t *streamTPM) err(err error) error {
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	if e := t.ctx.Err(); e != nil {
		return e
	}
	if dl, ok := t.ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded // the socket's timer fired first
	}
	return err
}

func (t *streamTPM) Close() error {
	t.stop()
	return t.conn.Close()
}

// Response codes that ask the caller to send the command again.
const (
	rcRetry20 = 0x922 // TPM_RC_RETRY
	rcRetry12 = 0x800 // TPM_RETRY
)

// Retrying wraps a TPM transport so that commands answered with TPM_RC_RETRY
// (TPM_RETRY for 1.2) are sent again, up to 10 times with a doubling pause
// from 1 ms: a fresh swtpm answers its first command so.
func Retrying(t transport.TPM) transport.TPM { return retrying{t} }

type retrying struct{ t transport.TPM }

func (r retrying) Send(cmd []byte) ([]byte, error) {
	for try := 0; ; try++ {
		rsp, err := r.t.Send(cmd)
		if err != nil || try == 10 || len(rsp) < 10 {
			return rsp, err
		}
		if rc := binary.BigEndian.Uint32(rsp[6:10]); rc != rcRetry20 && rc != rcRetry12 {
			return rsp, nil
		}
		time.Sleep(time.Millisecond << try)
	}
}
