package ctrl

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// wire runs fn against a Client whose peer expects exactly req (hex) and
// answers resp (hex): the bytes of tpm_ioctl.h's socket protocol.
func wire(t *testing.T, req, resp string, fn func(context.Context, *Client) error) error {
	t.Helper()
	client, server := net.Pipe()
	defer client.Close()
	want, _ := hex.DecodeString(req)
	answer, _ := hex.DecodeString(resp)
	got := make(chan []byte, 1)
	go func() {
		defer server.Close()
		b := make([]byte, len(want))
		if _, err := io.ReadFull(server, b); err != nil {
			got <- nil
			return
		}
		got <- b
		server.Write(answer)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := fn(ctx, New(client))
	if b := <-got; !bytes.Equal(b, want) {
		t.Fatalf("request %x; want %s", b, req)
	}
	return err
}

func TestEncoding(t *testing.T) {
	var caps Capabilities
	if err := wire(t, "00000001", "0000000000007fff", func(ctx context.Context, c *Client) (err error) {
		caps, err = c.GetCapability(ctx)
		return err
	}); err != nil || caps != 0x7fff || !caps.Has(CapInit|CapShutdown|CapGetInfo) {
		t.Fatalf("GetCapability: 0x%x, %v", caps, err)
	}
	if err := wire(t, "0000000200000001", "00000000", func(ctx context.Context, c *Client) error {
		return c.Init(ctx, InitDeleteVolatile)
	}); err != nil {
		t.Fatalf("Init: %v", err)
	}
	for name, tc := range map[string]struct {
		req string
		fn  func(context.Context, *Client) error
	}{
		"Shutdown":      {"00000003", func(ctx context.Context, c *Client) error { return c.Shutdown(ctx) }},
		"Stop":          {"0000000e", func(ctx context.Context, c *Client) error { return c.Stop(ctx) }},
		"StoreVolatile": {"0000000a", func(ctx context.Context, c *Client) error { return c.StoreVolatile(ctx) }},
		"SetLocality":   {"0000000503", func(ctx context.Context, c *Client) error { return c.SetLocality(ctx, 3) }},
	} {
		if err := wire(t, tc.req, "00000000", tc.fn); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	var cfg Config
	if err := wire(t, "0000000f", "0000000000000001", func(ctx context.Context, c *Client) (err error) {
		cfg, err = c.GetConfig(ctx)
		return err
	}); err != nil || cfg != ConfigFileKey {
		t.Fatalf("GetConfig: 0x%x, %v", cfg, err)
	}
	var est bool
	if err := wire(t, "00000004", "0000000001000000", func(ctx context.Context, c *Client) (err error) {
		est, err = c.GetTPMEstablished(ctx)
		return err
	}); err != nil || !est {
		t.Fatalf("GetTPMEstablished: %v, %v", est, err)
	}
	var bs BufferSize
	if err := wire(t, "0000001100001000", "00000000000010000000000a00001000", func(ctx context.Context, c *Client) (err error) {
		bs, err = c.SetBufferSize(ctx, 4096)
		return err
	}); err != nil || bs != (BufferSize{Current: 4096, Min: 10, Max: 4096}) {
		t.Fatalf("SetBufferSize: %+v, %v", bs, err)
	}
	var info []byte
	// GetInfo: flags (8), offset, pad; result, total length, length, text
	// with its NUL.
	if err := wire(t, "00000012"+"0000000000000001"+"00000000"+"00000000",
		"00000000"+"00000003"+"00000003"+"7b7d00", func(ctx context.Context, c *Client) (err error) {
			info, err = c.GetInfo(ctx, InfoTPMSpecification)
			return err
		}); err != nil || string(info) != "{}" {
		t.Fatalf("GetInfo: %q, %v", info, err)
	}
}

// A failed command's response is only the result code, whatever the
// command's success response holds: the client must not wait for more.
func TestErrorResponseIsFourBytes(t *testing.T) {
	err := wire(t, "0000000f", "0000000a", func(ctx context.Context, c *Client) error {
		_, err := c.GetConfig(ctx)
		return err
	})
	var re *ResultError
	if !errors.As(err, &re) || re.Command != CmdGetConfig || re.Code != ResultBadOrdinal {
		t.Fatalf("error %v; want ResultError{CMD_GET_CONFIG, 0xa}", err)
	}
	if re.Error() != "swtpm CMD_GET_CONFIG: TPM result 0xa" {
		t.Fatalf("message %q", re.Error())
	}
}

func TestContextEndsWait(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	go io.Copy(io.Discard, server) // reads, never answers
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := New(client).GetCapability(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v; want the context's deadline", err)
	}
}

func TestCommandNames(t *testing.T) {
	if CmdInit.String() != "CMD_INIT" || Command(0x99).String() != "CMD_0x99" {
		t.Fatal(CmdInit.String(), Command(0x99).String())
	}
}
