// Package ctrl speaks swtpm's control-channel protocol (the socket form of
// the commands in swtpm's include/swtpm/tpm_ioctl.h): a 4-byte big-endian
// command code, the command's request fields, and a response that starts
// with a 4-byte TPM result code. No Go library for it exists.
package ctrl

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"
)

// Command codes of the control channel (CMD_* in tpm_ioctl.h).
const (
	cmdGetCapability = 0x01
	cmdInit          = 0x02
	cmdShutdown      = 0x03
	cmdSetLocality   = 0x05
	cmdStoreVolatile = 0x0a
	cmdStop          = 0x0e
	cmdGetConfig     = 0x0f
)

// Capability bits of GetCapability (PTM_CAP_* in tpm_ioctl.h).
const (
	CapInit          = 1 << 0
	CapShutdown      = 1 << 1
	CapSetLocality   = 1 << 3
	CapStoreVolatile = 1 << 6
	CapStop          = 1 << 10
	CapGetConfig     = 1 << 11
	CapGetInfo       = 1 << 14
)

// Config flags of GetConfig (PTM_CONFIG_FLAG_*).
const (
	ConfigFileKey      = 1 << 0 // state encrypted with a key
	ConfigMigrationKey = 1 << 1
)

// InitDeleteVolatile makes Init discard the saved volatile state.
const InitDeleteVolatile = 1 << 0

// ResultError is a non-zero TPM result code in a control response.
type ResultError struct {
	Command uint32
	Code    uint32
}

func (e *ResultError) Error() string {
	return fmt.Sprintf("swtpm control command 0x%02x failed with TPM result 0x%x", e.Command, e.Code)
}

// Client is one connection to a control channel. swtpm serves one control
// connection at a time, so keep clients short-lived.
type Client struct {
	conn    net.Conn
	timeout time.Duration
}

// Dial connects to the control socket at path.
func Dial(path string) (*Client, error) {
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, timeout: 10 * time.Second}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// call sends cmd with its request fields and reads respLen response bytes,
// checking the leading result code when checked is set.
func (c *Client) call(cmd uint32, req []byte, respLen int) ([]byte, error) {
	c.conn.SetDeadline(time.Now().Add(c.timeout))
	msg := binary.BigEndian.AppendUint32(nil, cmd)
	if _, err := c.conn.Write(append(msg, req...)); err != nil {
		return nil, fmt.Errorf("sending control command 0x%02x: %w", cmd, err)
	}
	resp := make([]byte, respLen)
	if _, err := io.ReadFull(c.conn, resp); err != nil {
		return nil, fmt.Errorf("reading control response 0x%02x: %w", cmd, err)
	}
	if rc := binary.BigEndian.Uint32(resp); rc != 0 {
		return nil, &ResultError{Command: cmd, Code: rc}
	}
	return resp[4:], nil
}

// GetCapability returns the control commands this swtpm supports (Cap*).
func (c *Client) GetCapability() (uint32, error) {
	// The response is the 64-bit ptm_cap; swtpm fills its upper half with a
	// zero result code, so it reads like every other response.
	r, err := c.call(cmdGetCapability, nil, 8)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(r), nil
}

// Init (re)initialises the TPM, like a machine's reset line: never send it
// to the TPM of a running guest, whose state it resets.
func (c *Client) Init(flags uint32) error {
	_, err := c.call(cmdInit, binary.BigEndian.AppendUint32(nil, flags), 4)
	return err
}

// Shutdown saves the TPM's state and makes swtpm exit.
func (c *Client) Shutdown() error {
	_, err := c.call(cmdShutdown, nil, 4)
	return err
}

// Stop halts the TPM without exiting swtpm (until the next Init).
func (c *Client) Stop() error {
	_, err := c.call(cmdStop, nil, 4)
	return err
}

// StoreVolatile writes the TPM's volatile state to its state directory.
func (c *Client) StoreVolatile() error {
	_, err := c.call(cmdStoreVolatile, nil, 4)
	return err
}

// SetLocality sets the locality of subsequent TPM commands.
func (c *Client) SetLocality(loc uint8) error {
	_, err := c.call(cmdSetLocality, []byte{loc}, 4)
	return err
}

// GetConfig returns swtpm's configuration flags (Config*).
func (c *Client) GetConfig() (uint32, error) {
	r, err := c.call(cmdGetConfig, nil, 8)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(r), nil
}
