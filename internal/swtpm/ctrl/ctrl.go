// Package ctrl speaks swtpm's control channel, the socket form of the
// commands in swtpm's include/swtpm/tpm_ioctl.h ("Commands used by the
// non-CUSE TPMs"). No Go library for it exists.
//
// Wire format, all integers big-endian: a request is a 4-byte command code
// (CMD_*) followed by the request half of the command's ptm_* struct; a
// response is the response half, which starts with a 4-byte TPM result code
// (ptm_res). When that code is not 0, swtpm sends nothing after it, whatever
// the command. The one exception is CMD_GET_CAPABILITY, whose response is a
// bare 64-bit capability mask (ptm_cap) with no result code; as the mask fits
// in 32 bits, it reads the same as the newer ptm_cap_n {result 0, caps}.
//
// swtpm serves one control connection at a time and blocks the others, so
// keep a Client only as long as needed. A Client is safe for concurrent use.
//
// Never send Init to the TPM of a running guest: CMD_INIT is the TPM's reset
// line, and the guest's TPM state (PCRs, sessions, loaded keys) is lost.
package ctrl

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// Command is a control-channel command code (CMD_* in tpm_ioctl.h).
type Command uint32

// The commands of swtpm 0.7 (tpm_ioctl.h); not all have a method here.
const (
	CmdGetCapability       Command = 0x01
	CmdInit                Command = 0x02
	CmdShutdown            Command = 0x03
	CmdGetTPMEstablished   Command = 0x04
	CmdSetLocality         Command = 0x05
	CmdHashStart           Command = 0x06
	CmdHashData            Command = 0x07
	CmdHashEnd             Command = 0x08
	CmdCancelTPMCmd        Command = 0x09
	CmdStoreVolatile       Command = 0x0a
	CmdResetTPMEstablished Command = 0x0b
	CmdGetStateBlob        Command = 0x0c
	CmdSetStateBlob        Command = 0x0d
	CmdStop                Command = 0x0e
	CmdGetConfig           Command = 0x0f
	CmdSetDataFD           Command = 0x10
	CmdSetBufferSize       Command = 0x11
	CmdGetInfo             Command = 0x12
)

var commandNames = map[Command]string{
	CmdGetCapability: "CMD_GET_CAPABILITY", CmdInit: "CMD_INIT", CmdShutdown: "CMD_SHUTDOWN",
	CmdGetTPMEstablished: "CMD_GET_TPMESTABLISHED", CmdSetLocality: "CMD_SET_LOCALITY",
	CmdHashStart: "CMD_HASH_START", CmdHashData: "CMD_HASH_DATA", CmdHashEnd: "CMD_HASH_END",
	CmdCancelTPMCmd: "CMD_CANCEL_TPM_CMD", CmdStoreVolatile: "CMD_STORE_VOLATILE",
	CmdResetTPMEstablished: "CMD_RESET_TPMESTABLISHED", CmdGetStateBlob: "CMD_GET_STATEBLOB",
	CmdSetStateBlob: "CMD_SET_STATEBLOB", CmdStop: "CMD_STOP", CmdGetConfig: "CMD_GET_CONFIG",
	CmdSetDataFD: "CMD_SET_DATAFD", CmdSetBufferSize: "CMD_SET_BUFFERSIZE", CmdGetInfo: "CMD_GET_INFO",
}

func (c Command) String() string {
	if n, ok := commandNames[c]; ok {
		return n
	}
	return fmt.Sprintf("CMD_0x%02x", uint32(c))
}

// Capabilities is the mask GetCapability returns (PTM_CAP_*).
type Capabilities uint64

// Capability bits (PTM_CAP_* in tpm_ioctl.h).
const (
	CapInit              Capabilities = 1 << 0
	CapShutdown          Capabilities = 1 << 1
	CapGetTPMEstablished Capabilities = 1 << 2
	CapSetLocality       Capabilities = 1 << 3
	CapHashing           Capabilities = 1 << 4
	CapCancelTPMCmd      Capabilities = 1 << 5
	CapStoreVolatile     Capabilities = 1 << 6
	CapResetEstablished  Capabilities = 1 << 7
	CapGetStateBlob      Capabilities = 1 << 8
	CapSetStateBlob      Capabilities = 1 << 9
	CapStop              Capabilities = 1 << 10
	CapGetConfig         Capabilities = 1 << 11
	CapSetDataFD         Capabilities = 1 << 12
	CapSetBufferSize     Capabilities = 1 << 13
	CapGetInfo           Capabilities = 1 << 14
)

// Has reports whether every bit of want is set.
func (c Capabilities) Has(want Capabilities) bool { return c&want == want }

// Config is the flag set GetConfig returns (PTM_CONFIG_FLAG_*).
type Config uint32

// Config flags.
const (
	ConfigFileKey      Config = 0x1 // the state files are encrypted with a key
	ConfigMigrationKey Config = 0x2 // state blobs are encrypted for migration
)

// InitFlags modify Init (PTM_INIT_FLAG_*).
type InitFlags uint32

// InitDeleteVolatile deletes the volatile-state file after reading it.
const InitDeleteVolatile InitFlags = 1 << 0

// Info selects what GetInfo reports (SWTPM_INFO_*).
type Info uint64

// Info selectors of swtpm 0.7.
const (
	InfoTPMSpecification Info = 1 << 0
	InfoTPMAttributes    Info = 1 << 1
)

// TPM result codes swtpm puts in control responses (TPM 1.2 TPM_RESULT
// values, whatever the TPM version).
const (
	ResultSuccess      uint32 = 0x00
	ResultFail         uint32 = 0x09 // TPM_FAIL: e.g. the state did not load
	ResultBadParameter uint32 = 0x03 // TPM_BAD_PARAMETER: malformed request
	ResultBadOrdinal   uint32 = 0x0a // TPM_BAD_ORDINAL: unknown command, or TPM (not) running
	ResultSize         uint32 = 0x17 // TPM_SIZE: out of memory
	ResultIOError      uint32 = 0x1f // TPM_IOERROR
	ResultBadLocality  uint32 = 0x3d // TPM_BAD_LOCALITY
)

// ResultError is a control command that swtpm answered with a non-zero
// result code.
type ResultError struct {
	Command Command
	Code    uint32
}

func (e *ResultError) Error() string {
	return fmt.Sprintf("swtpm %s: TPM result 0x%x", e.Command, e.Code)
}

// ErrShortResponse: swtpm's answer was shorter than its command defines.
var ErrShortResponse = errors.New("short swtpm control response")

// Client is a connection to swtpm's control channel.
type Client struct {
	mu   sync.Mutex // one command in flight: responses carry no tag
	conn net.Conn
}

// Dial connects to the control socket at path.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connecting to swtpm control channel: %w", err)
	}
	return New(conn), nil
}

// New runs the protocol over an established connection, such as one end of
// a socketpair whose other end swtpm got as --ctrl clientfd=N.
func New(conn net.Conn) *Client { return &Client{conn: conn} }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// encodeRequest is the wire form of a command with its request fields.
func encodeRequest(cmd Command, req []byte) []byte {
	return append(binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(req)), uint32(cmd)), req...)
}

// roundTrip sends cmd with req and reads the response: for every command
// but GetCapability a result code, and when it is 0, respLen more bytes.
func (c *Client) roundTrip(ctx context.Context, cmd Command, req []byte, respLen int) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	stop := c.bind(ctx)
	defer stop()
	if _, err := c.conn.Write(encodeRequest(cmd, req)); err != nil {
		return nil, fmt.Errorf("sending swtpm %s: %w", cmd, ctxErr(ctx, err))
	}
	return c.readResponse(ctx, cmd, respLen)
}

func (c *Client) readResponse(ctx context.Context, cmd Command, respLen int) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(c.conn, hdr[:]); err != nil {
		return nil, fmt.Errorf("reading swtpm %s response: %w", cmd, ctxErr(ctx, err))
	}
	if cmd != CmdGetCapability {
		if rc := binary.BigEndian.Uint32(hdr[:]); rc != ResultSuccess {
			return nil, &ResultError{Command: cmd, Code: rc}
		}
	}
	resp := make([]byte, 4+respLen)
	copy(resp, hdr[:])
	if _, err := io.ReadFull(c.conn, resp[4:]); err != nil {
		return nil, fmt.Errorf("reading swtpm %s response: %w", cmd, ctxErr(ctx, err))
	}
	return resp, nil
}

// bind makes ctx's deadline and cancellation interrupt blocked I/O.
func (c *Client) bind(ctx context.Context) (stop func()) {
	dl, _ := ctx.Deadline()
	c.conn.SetDeadline(dl) // zero: no deadline
	after := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	return func() { after() }
}

// ctxErr reports the timeout ctx caused as ctx's error.
func ctxErr(ctx context.Context, err error) error {
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	if e := ctx.Err(); e != nil {
		return e
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded // the socket's timer fired first
	}
	return err
}

// GetCapability returns the control commands this swtpm supports.
func (c *Client) GetCapability(ctx context.Context) (Capabilities, error) {
	r, err := c.roundTrip(ctx, CmdGetCapability, nil, 4)
	if err != nil {
		return 0, err
	}
	return Capabilities(binary.BigEndian.Uint64(r)), nil
}

// Init (re)initialises the TPM, like a machine's reset line: the TPM loads
// its state from disk and waits for TPM_Startup. swtpm answers ResultFail
// when the state does not load, for example with a wrong key.
//
// Never send Init to the TPM of a running guest; it loses its volatile
// state. QEMU sends it itself when the machine resets.
func (c *Client) Init(ctx context.Context, flags InitFlags) error {
	_, err := c.roundTrip(ctx, CmdInit, binary.BigEndian.AppendUint32(nil, uint32(flags)), 0)
	return err
}

// Shutdown ends the TPM and makes swtpm exit; swtpm answers first.
func (c *Client) Shutdown(ctx context.Context) error {
	_, err := c.roundTrip(ctx, CmdShutdown, nil, 0)
	return err
}

// Stop halts the TPM but keeps swtpm running, until the next Init.
func (c *Client) Stop(ctx context.Context) error {
	_, err := c.roundTrip(ctx, CmdStop, nil, 0)
	return err
}

// StoreVolatile writes the TPM's volatile state into its state directory.
func (c *Client) StoreVolatile(ctx context.Context) error {
	_, err := c.roundTrip(ctx, CmdStoreVolatile, nil, 0)
	return err
}

// SetLocality sets the locality (0-4) of the following TPM commands.
func (c *Client) SetLocality(ctx context.Context, locality uint8) error {
	_, err := c.roundTrip(ctx, CmdSetLocality, []byte{locality}, 0)
	return err
}

// GetTPMEstablished reports the TPM's tpmEstablished bit.
func (c *Client) GetTPMEstablished(ctx context.Context) (bool, error) {
	r, err := c.roundTrip(ctx, CmdGetTPMEstablished, nil, 4) // bit + 3 bytes padding
	if err != nil {
		return false, err
	}
	return r[4] != 0, nil
}

// GetConfig returns how swtpm was configured.
func (c *Client) GetConfig(ctx context.Context) (Config, error) {
	r, err := c.roundTrip(ctx, CmdGetConfig, nil, 4)
	if err != nil {
		return 0, err
	}
	return Config(binary.BigEndian.Uint32(r[4:])), nil
}

// BufferSize is what SetBufferSize reports, in bytes.
type BufferSize struct{ Current, Min, Max uint32 }

// SetBufferSize sets the TPM's I/O buffer size; 0 only queries it. Setting
// needs a stopped TPM (Stop), as QEMU does before Init.
func (c *Client) SetBufferSize(ctx context.Context, size uint32) (BufferSize, error) {
	r, err := c.roundTrip(ctx, CmdSetBufferSize, binary.BigEndian.AppendUint32(nil, size), 12)
	if err != nil {
		return BufferSize{}, err
	}
	be := binary.BigEndian
	return BufferSize{Current: be.Uint32(r[4:]), Min: be.Uint32(r[8:]), Max: be.Uint32(r[12:])}, nil
}

// GetInfo returns libtpms's JSON description of what selects, for example
// {"TPMSpecification":{...}}.
func (c *Client) GetInfo(ctx context.Context, what Info) ([]byte, error) {
	var out []byte
	for {
		req := binary.BigEndian.AppendUint64(nil, uint64(what))
		req = binary.BigEndian.AppendUint32(req, uint32(len(out))) // offset
		req = binary.BigEndian.AppendUint32(req, 0)                // pad
		chunk, total, err := c.getInfo(ctx, req)
		if err != nil {
			return nil, err
		}
		out = append(out, chunk...)
		if len(chunk) == 0 || len(out) >= int(total) {
			break
		}
	}
	// The length counts the C string's terminating NUL.
	if n := len(out); n > 0 && out[n-1] == 0 {
		out = out[:n-1]
	}
	return out, nil
}

// getInfo is one CMD_GET_INFO exchange: result, totlength, length, data.
func (c *Client) getInfo(ctx context.Context, req []byte) (chunk []byte, total uint32, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	stop := c.bind(ctx)
	defer stop()
	if _, err := c.conn.Write(encodeRequest(CmdGetInfo, req)); err != nil {
		return nil, 0, fmt.Errorf("sending swtpm %s: %w", CmdGetInfo, ctxErr(ctx, err))
	}
	r, err := c.readResponse(ctx, CmdGetInfo, 8)
	if err != nil {
		return nil, 0, err
	}
	total, n := binary.BigEndian.Uint32(r[4:]), binary.BigEndian.Uint32(r[8:])
	if n > 1<<20 {
		return nil, 0, ErrShortResponse
	}
	chunk = make([]byte, n)
	if _, err := io.ReadFull(c.conn, chunk); err != nil {
		return nil, 0, fmt.Errorf("reading swtpm %s response: %w", CmdGetInfo, ctxErr(ctx, err))
	}
	return chunk, total, nil
}

// SetDataFD hands swtpm the data channel as a file descriptor (SCM_RIGHTS),
// the way QEMU attaches: swtpm then serves TPM commands on f (one end of a
// socketpair) instead of its --server socket, until f is closed. Needs a
// unix-socket connection.
func (c *Client) SetDataFD(ctx context.Context, f *os.File) error {
	uc, ok := c.conn.(*net.UnixConn)
	if !ok {
		return errors.New("swtpm CMD_SET_DATAFD needs a unix socket")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	stop := c.bind(ctx)
	defer stop()
	oob := syscall.UnixRights(int(f.Fd()))
	if _, _, err := uc.WriteMsgUnix(encodeRequest(CmdSetDataFD, nil), oob, nil); err != nil {
		return fmt.Errorf("sending swtpm %s: %w", CmdSetDataFD, ctxErr(ctx, err))
	}
	_, err := c.readResponse(ctx, CmdSetDataFD, 0)
	return err
}
