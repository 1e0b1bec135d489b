package swtpm

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"

	"github.com/google/go-tpm/tpm2/transport"
)

// TPM 1.2 ordinals and constants (TPM Main Part 2 and 3, v1.2 rev 116).
const (
	tagRquCommand             = 0x00c1
	ordCreateEndorsementPair  = 0x78
	ordPhysicalEnable         = 0x6f
	ordPhysicalSetDeactivated = 0x72
	ordTSCPhysicalPresence    = 0x4000000a
	ordSaveState              = 0x98
	ordStartup                = 0x99
	stClear                   = 0x0001
	rcInvalidPostInit         = 0x26
	ppCmdEnable               = 0x0020
	ppPresent                 = 0x0008
	algRSA                    = 0x00000001
	esRSAOAEP                 = 0x0003
	ssNone                    = 0x0001
)

// manufacture12 creates a TPM 1.2's endorsement key, certifies it, and
// enables and activates the TPM the way swtpm_setup does (physical presence,
// then TPM_PhysicalEnable and TPM_PhysicalSetDeactivated(false)).
func manufacture12(ctx context.Context, tpm transport.TPM, opts ManufactureOptions) (*Identity, error) {
	pub, err := createEK12(tpm)
	if err != nil {
		return nil, fmt.Errorf("creating TPM 1.2 EK: %w", err)
	}
	for _, c := range [][]byte{
		cmd12(ordTSCPhysicalPresence, binary.BigEndian.AppendUint16(nil, ppCmdEnable)),
		cmd12(ordTSCPhysicalPresence, binary.BigEndian.AppendUint16(nil, ppPresent)),
		cmd12(ordPhysicalEnable, nil),
		cmd12(ordPhysicalSetDeactivated, []byte{0}),
	} {
		if _, err := send12(tpm, c); err != nil {
			return nil, err
		}
	}
	ek := EK{Kind: RSA2048, Public: pub}
	if opts.Certify != nil {
		if ek.CertDER, err = opts.Certify(ctx, RSA2048, pub); err != nil {
			return nil, fmt.Errorf("certifying TPM 1.2 EK: %w", err)
		}
	}
	return &Identity{EKs: []EK{ek}}, nil
}

func createEK12(tpm transport.TPM) (*rsa.PublicKey, error) {
	nonce := make([]byte, 20)
	rand.Read(nonce)
	be := binary.BigEndian
	body := append([]byte{}, nonce...)
	body = be.AppendUint32(body, algRSA)
	body = be.AppendUint16(body, esRSAOAEP)
	body = be.AppendUint16(body, ssNone)
	body = be.AppendUint32(body, 12)   // parmSize
	body = be.AppendUint32(body, 2048) // keyLength
	body = be.AppendUint32(body, 2)    // numPrimes
	body = be.AppendUint32(body, 0)    // exponentSize: default 65537
	rsp, err := send12(tpm, cmd12(ordCreateEndorsementPair, body))
	if err != nil {
		return nil, err
	}
	return parsePubkey12(rsp)
}

// parsePubkey12 reads a TPM_PUBKEY holding an RSA key.
func parsePubkey12(b []byte) (*rsa.PublicKey, error) {
	be := binary.BigEndian
	short := errors.New("short TPM_PUBKEY")
	if len(b) < 12 {
		return nil, short
	}
	parmSize := int(be.Uint32(b[8:12]))
	b = b[12:]
	if len(b) < parmSize || parmSize < 12 {
		return nil, short
	}
	expSize := int(be.Uint32(b[8:12]))
	e := 65537
	if expSize > 0 && 12+expSize <= parmSize {
		e = int(new(big.Int).SetBytes(b[12 : 12+expSize]).Int64())
	}
	b = b[parmSize:]
	if len(b) < 4 {
		return nil, short
	}
	n := int(be.Uint32(b[:4]))
	if len(b) < 4+n {
		return nil, short
	}
	return &rsa.PublicKey{N: new(big.Int).SetBytes(b[4 : 4+n]), E: e}, nil
}

func cmd12(ordinal uint32, body []byte) []byte {
	be := binary.BigEndian
	c := be.AppendUint16(nil, tagRquCommand)
	c = be.AppendUint32(c, uint32(10+len(body)))
	c = be.AppendUint32(c, ordinal)
	return append(c, body...)
}

// send12 sends a TPM 1.2 command and returns the response body.
func send12(tpm transport.TPM, cmd []byte) ([]byte, error) {
	rsp, err := tpm.Send(cmd)
	if err != nil {
		return nil, err
	}
	if len(rsp) < 10 {
		return nil, errors.New("short TPM 1.2 response")
	}
	if rc := binary.BigEndian.Uint32(rsp[6:10]); rc != 0 {
		return nil, fmt.Errorf("TPM 1.2 ordinal 0x%x: %w", binary.BigEndian.Uint32(cmd[6:10]), rc12(rc))
	}
	return rsp[10:], nil
}

// startup12 sends TPM_Startup(ST_CLEAR), tolerating a TPM swtpm already
// started.
func startup12(tpm transport.TPM) error {
	_, err := send12(tpm, cmd12(ordStartup, binary.BigEndian.AppendUint16(nil, stClear)))
	var rc rc12
	if errors.As(err, &rc) && rc == rcInvalidPostInit {
		return nil
	}
	return err
}

// rc12 is a TPM 1.2 return code.
type rc12 uint32

func (r rc12) Error() string { return fmt.Sprintf("TPM 1.2 error 0x%x", uint32(r)) }
