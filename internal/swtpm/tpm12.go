package swtpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
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
	ordNVDefineSpace          = 0xcc
	ordNVWriteValue           = 0xcd
	ordTSCPhysicalPresence    = 0x4000000a
	ordSaveState              = 0x98
	ordGetRandom              = 0x46
	ordStartup                = 0x99
	stClear                   = 0x0001
	rcInvalidPostInit         = 0x26
	ppCmdEnable               = 0x0020
	ppPresent                 = 0x0008
	algRSA                    = 0x00000001
	esRSAOAEP                 = 0x0003 // TPM_ES_RSAESOAEP_SHA1_MGF1
	ssNone                    = 0x0001
	tagNVDataPublic           = 0x0018
	tagNVAttributes           = 0x0017
	nvPerOwnerRead            = 0x00020000
	nvPerOwnerWrite           = 0x00000002
	nvIndexLock               = 0xffffffff
	locAll                    = 0x1f
)

// TCG stored-certificate header tags (PC Client Implementation
// Specification for Conventional BIOS 1.21, 7.4.4).
const (
	tagPCClientStoredCert = 0x1001
	tagPCClientFullCert   = 0x1002
)

// manufacture12 makes a fresh TPM 1.2 (started by swtpm) into a vTPM as
// swtpm_setup --createek --create-ek-cert --lock-nvram does: physical
// presence, enable, activate (from the next start), EK, EK certificate in
// NV, NV lock. No owner is installed; that is the guest's business.
func manufacture12(ctx context.Context, tpm transport.TPM, certify func(context.Context, EKKind, crypto.PublicKey) ([]byte, error),
	sw *stopwatch) (*Identity, error) {
	be := binary.BigEndian
	for _, c := range [][]byte{
		cmd12(ordTSCPhysicalPresence, be.AppendUint16(nil, ppCmdEnable)),
		cmd12(ordTSCPhysicalPresence, be.AppendUint16(nil, ppPresent)),
		cmd12(ordPhysicalEnable, nil),
		cmd12(ordPhysicalSetDeactivated, []byte{0}),
	} {
		if _, err := send12(tpm, c); err != nil {
			return nil, err
		}
	}
	sw.lap("enable")
	pub, err := createEK12(tpm)
	if err != nil {
		return nil, fmt.Errorf("creating the TPM 1.2 EK: %w", err)
	}
	sw.lap("ek_" + string(RSA2048))
	ek := EK{Kind: RSA2048, Public: pub}
	if ek.CertDER, err = certifyAsync(ctx, certify, RSA2048, pub)(); err != nil {
		return nil, err
	}
	sw.lap("certify_wait_" + string(RSA2048))
	if ek.CertDER != nil {
		if err := writeNV12(tpm, EKCertNV12, storedCert(ek.CertDER)); err != nil {
			return nil, fmt.Errorf("storing the TPM 1.2 EK certificate: %w", err)
		}
		ek.NVIndex = EKCertNV12
	}
	sw.lap("nv_" + string(RSA2048))
	// Defining TPM_NV_INDEX_LOCK sets nvLocked: from now on NV needs
	// authorisation (swtpm_setup --lock-nvram).
	if _, err := send12(tpm, cmd12(ordNVDefineSpace, nvDataPublic12(nvIndexLock, 0, 0))); err != nil {
		return nil, fmt.Errorf("locking NV: %w", err)
	}
	return &Identity{EKs: []EK{ek}}, nil
}

// createEK12 runs TPM_CreateEndorsementKeyPair for an RSA-2048 OAEP key,
// as swtpm_setup does, and checks the response's checksum.
func createEK12(tpm transport.TPM) (*rsa.PublicKey, error) {
	nonce := make([]byte, sha1.Size)
	rand.Read(nonce)
	be := binary.BigEndian
	body := append([]byte{}, nonce...)
	body = be.AppendUint32(body, algRSA)
	body = be.AppendUint16(body, esRSAOAEP)
	body = be.AppendUint16(body, ssNone)
	body = be.AppendUint32(body, 12)   // parmSize: TPM_RSA_KEY_PARMS below
	body = be.AppendUint32(body, 2048) // keyLength
	body = be.AppendUint32(body, 2)    // numPrimes
	body = be.AppendUint32(body, 0)    // exponentSize 0: 65537
	rsp, err := send12(tpm, cmd12(ordCreateEndorsementPair, body))
	if err != nil {
		return nil, err
	}
	return pubekWithChecksum(rsp, nonce)
}

// pubekWithChecksum parses a TPM_PUBKEY followed by checksum =
// SHA-1(TPM_PUBKEY || antiReplay), the answer of TPM_CreateEndorsementKeyPair
// and TPM_ReadPubek.
func pubekWithChecksum(rsp, antiReplay []byte) (*rsa.PublicKey, error) {
	pub, n, err := parsePubkey12(rsp)
	if err != nil {
		return nil, err
	}
	if len(rsp) < n+sha1.Size {
		return nil, errors.New("EK response without checksum")
	}
	sum := sha1.Sum(append(append([]byte{}, rsp[:n]...), antiReplay...))
	if !bytes.Equal(sum[:], rsp[n:n+sha1.Size]) {
		return nil, errors.New("EK response checksum mismatch")
	}
	return pub, nil
}

// parsePubkey12 reads a TPM_PUBKEY holding an RSA key and returns it with
// the number of bytes it took.
func parsePubkey12(b []byte) (*rsa.PublicKey, int, error) {
	be := binary.BigEndian
	short := errors.New("short TPM_PUBKEY")
	if len(b) < 12 {
		return nil, 0, short
	}
	if be.Uint32(b) != algRSA {
		return nil, 0, fmt.Errorf("TPM_PUBKEY of algorithm %d, not RSA", be.Uint32(b))
	}
	parmSize := int(be.Uint32(b[8:12]))
	parms := b[12:]
	if parmSize < 12 || len(parms) < parmSize {
		return nil, 0, short
	}
	e := 65537
	if expSize := int(be.Uint32(parms[8:12])); expSize > 0 {
		if expSize > 4 || 12+expSize > parmSize {
			return nil, 0, errors.New("bad TPM_RSA_KEY_PARMS exponent")
		}
		e = int(new(big.Int).SetBytes(parms[12 : 12+expSize]).Int64())
	}
	rest := parms[parmSize:]
	if len(rest) < 4 {
		return nil, 0, short
	}
	n := int(be.Uint32(rest))
	if len(rest) < 4+n {
		return nil, 0, short
	}
	pub := &rsa.PublicKey{N: new(big.Int).SetBytes(rest[4 : 4+n]), E: e}
	return pub, 12 + parmSize + 4 + n, nil
}

// storedCert wraps a DER certificate in the TCG header a TPM 1.2's EK
// certificate index holds: TCG_PCCLIENT_STORED_CERT {tag, certType 0 (full
// certificate), certSize}, then TCG_FULL_CERT {tag, DER}.
func storedCert(der []byte) []byte {
	be := binary.BigEndian
	b := be.AppendUint16(nil, tagPCClientStoredCert)
	b = append(b, 0)
	b = be.AppendUint16(b, uint16(len(der)+2))
	b = be.AppendUint16(b, tagPCClientFullCert)
	return append(b, der...)
}

// writeNV12 defines index (owner-read, owner-write, as swtpm_setup) and
// writes data, both unauthorised, which a TPM 1.2 allows until nvLocked.
func writeNV12(tpm transport.TPM, index uint32, data []byte) error {
	if len(data) > 0xffff-7 {
		return fmt.Errorf("%d bytes do not fit an NV index", len(data))
	}
	if _, err := send12(tpm, cmd12(ordNVDefineSpace, nvDataPublic12(index, nvPerOwnerRead|nvPerOwnerWrite, uint32(len(data))))); err != nil {
		return err
	}
	be := binary.BigEndian
	body := be.AppendUint32(nil, index)
	body = be.AppendUint32(body, 0) // offset
	body = be.AppendUint32(body, uint32(len(data)))
	_, err := send12(tpm, cmd12(ordNVWriteValue, append(body, data...)))
	return err
}

// nvDataPublic12 is TPM_NV_DefineSpace's body: TPM_NV_DATA_PUBLIC with no
// PCR binding (any locality) and the given permissions and size, and a zero
// encAuth.
func nvDataPublic12(index, attrs, size uint32) []byte {
	be := binary.BigEndian
	// TPM_PCR_INFO_SHORT: 3-byte empty selection, all localities, zero digest.
	pcrInfo := append([]byte{0, 3, 0, 0, 0, locAll}, make([]byte, sha1.Size)...)
	b := be.AppendUint16(nil, tagNVDataPublic)
	b = be.AppendUint32(b, index)
	b = append(b, pcrInfo...) // pcrInfoRead
	b = append(b, pcrInfo...) // pcrInfoWrite
	b = be.AppendUint16(b, tagNVAttributes)
	b = be.AppendUint32(b, attrs)
	b = append(b, 0, 0, 0) // bReadSTClear, bWriteSTClear, bWriteDefine
	b = be.AppendUint32(b, size)
	return append(b, make([]byte, sha1.Size)...) // encAuth
}

func cmd12(ordinal uint32, body []byte) []byte {
	be := binary.BigEndian
	c := be.AppendUint16(make([]byte, 0, 10+len(body)), tagRquCommand)
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
		return nil, fmt.Errorf("TPM 1.2 ordinal 0x%x: %w", binary.BigEndian.Uint32(cmd[6:10]), RC12(rc))
	}
	return rsp[10:], nil
}

// startup12 sends TPM_Startup(ST_CLEAR), tolerating a TPM already started.
func startup12(tpm transport.TPM) error {
	_, err := send12(tpm, cmd12(ordStartup, binary.BigEndian.AppendUint16(nil, stClear)))
	if rc := RC12(0); errors.As(err, &rc) && rc == rcInvalidPostInit {
		return nil
	}
	return err
}

// RC12 is a TPM 1.2 return code (TPM_RESULT).
type RC12 uint32

func (r RC12) Error() string { return fmt.Sprintf("TPM 1.2 error 0x%x", uint32(r)) }
