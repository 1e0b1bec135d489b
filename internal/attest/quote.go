package attest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/big"
	"math/bits"

	"github.com/google/go-tpm/tpm2"
)

// Quote is what a verified TPM2_Quote vouches for.
type Quote struct {
	Clock        uint64 // ms the TPM has been powered, never reported going back unless Safe is false
	ResetCount   uint32 // TPM resets (reboots) since the TPM was cleared
	RestartCount uint32 // resumes since the last reset
	Safe         bool
	PCRs         map[int][]byte // the SHA-256 PCR values the quote covers
}

// Errors a quote can fail with; wrapped with the detail.
var (
	ErrSignature = errors.New("the quote is not signed by the registered attestation key")
	ErrNonce     = errors.New("the quote does not answer this nonce")
	ErrPCRDigest = errors.New("the reported PCR values are not the ones quoted")
	ErrRollback  = errors.New("the TPM's counters went back")
)

// VerifyQuote checks that attest (a TPMS_ATTEST as TPM2_Quote returns it)
// carries signature sig (a marshalled TPMT_SIGNATURE) by ak, answers nonce,
// and quotes exactly the SHA-256 PCR values pcrs; it returns what the quote
// vouches for (its PCRs are pcrs, shared: not to be changed after).
func VerifyQuote(ak *AK, attest, sig, nonce []byte, pcrs map[int][]byte) (*Quote, error) {
	if err := verifySignature(ak, attest, sig); err != nil {
		return nil, err
	}
	var a quoteFields
	if err := a.parse(attest); err != nil {
		return nil, err
	}
	if !bytes.Equal(a.extraData, nonce) {
		return nil, ErrNonce
	}
	// The values in PCR order, hashed at once: room on the stack for all 24.
	values := make([]byte, 0, 24*sha256.Size)
	n := 0
	for byteIdx, v := range a.selected {
		for ; v != 0; v &= v - 1 {
			i := byteIdx*8 + bits.TrailingZeros8(v)
			pv, ok := pcrs[i]
			if !ok || len(pv) != sha256.Size {
				return nil, fmt.Errorf("%w: PCR %d is quoted but not reported", ErrPCRDigest, i)
			}
			values = append(values, pv...)
			n++
		}
	}
	if len(pcrs) != n {
		return nil, fmt.Errorf("%w: %d PCRs reported, %d quoted", ErrPCRDigest, len(pcrs), n)
	}
	if d := sha256.Sum256(values); !bytes.Equal(d[:], a.pcrDigest) {
		return nil, ErrPCRDigest
	}
	q := a.q
	q.PCRs = pcrs
	return &q, nil
}

// quoteFields are the parts of a TPMS_ATTEST of type quote the verifier
// uses.
type quoteFields struct {
	q         Quote
	extraData []byte
	// selected has bit i%8 of byte i/8 on when SHA-256 PCR i is quoted
	// (the selections ORed: a PCR selected twice is quoted once).
	selected  [maxSelect]byte
	pcrDigest []byte
}

// maxSelect bounds a TPMS_PCR_SELECTION's sizeofSelect (a UINT8).
const maxSelect = 255

// parse reads a TPMS_ATTEST (TPM 2.0 Part 2, 10.12.12; big-endian) by
// hand: it is on the verifier's hot path, where reflection costs as much as
// the signature check.
func (f *quoteFields) parse(b []byte) error {
	r := reader{b: b, bigEndian: true}
	magic, typ := r.u32(), r.u16()
	r.tpm2b() // qualifiedSigner
	f.extraData = r.tpm2b()
	f.q.Clock, f.q.ResetCount, f.q.RestartCount, f.q.Safe = r.u64(), r.u32(), r.u32(), r.u8() == 1
	r.u64() // firmwareVersion
	if r.err == nil && (magic != uint32(tpm2.TPMGeneratedValue) || typ != uint16(tpm2.TPMSTAttestQuote)) {
		return errors.New("the signed structure is not a TPM-generated quote")
	}
	n := r.u32()
	if n > 8 {
		return fmt.Errorf("parsing the quote: %d PCR selections", n)
	}
	for range n {
		hash, size := r.u16(), int(r.u8())
		sel := r.bytes(size)
		if r.err == nil && hash != uint16(tpm2.TPMAlgSHA256) {
			return fmt.Errorf("the quote covers the bank 0x%x; only SHA-256 is accepted", hash)
		}
		for i, v := range sel {
			f.selected[i] |= v
		}
	}
	f.pcrDigest = r.tpm2b()
	if r.err != nil || r.off != len(b) {
		return errors.New("parsing the quote: malformed TPMS_ATTEST")
	}
	return nil
}

func verifySignature(ak *AK, msg, sig []byte) error {
	r := reader{b: sig, bigEndian: true}
	alg, hash := r.u16(), r.u16()
	if r.err != nil || hash != uint16(tpm2.TPMAlgSHA256) {
		return fmt.Errorf("%w: want a SHA-256 signature", ErrSignature)
	}
	digest := sha256.Sum256(msg)
	switch k := ak.Key.(type) {
	case *rsa.PublicKey:
		s := r.tpm2b()
		switch {
		case alg != uint16(tpm2.TPMAlgRSASSA) || r.err != nil || r.off != len(sig):
			return fmt.Errorf("%w: want an RSASSA signature", ErrSignature)
		case ak.rsa == nil:
			return fmt.Errorf("%w: the AK was not made by ParseAK", ErrSignature)
		case !ak.rsa.verify(&digest, s):
			return ErrSignature
		}
	case *ecdsa.PublicKey:
		rb, sb := r.tpm2b(), r.tpm2b()
		if alg != uint16(tpm2.TPMAlgECDSA) || r.err != nil || r.off != len(sig) {
			return fmt.Errorf("%w: want an ECDSA signature", ErrSignature)
		}
		if !ecdsa.Verify(k, digest[:], new(big.Int).SetBytes(rb), new(big.Int).SetBytes(sb)) {
			return ErrSignature
		}
	default:
		return fmt.Errorf("%w: unsupported key %T", ErrSignature, ak.Key)
	}
	return nil
}

// tpm2b reads a TPM2B: a 16-bit size, then that many bytes.
func (r *reader) tpm2b() []byte { return r.bytes(int(r.u16())) }

// CheckProgress refuses a quote whose TPM counters go back from the last
// accepted one: a replayed quote, or a TPM state rolled back to a copy.
// Within one reset the restart count may not fall and the clock must
// advance; across resets the reset count may only grow.
func CheckProgress(prev, cur *Quote) error {
	switch {
	case prev == nil:
		return nil
	case cur.ResetCount < prev.ResetCount:
		return fmt.Errorf("%w: reset count %d after %d", ErrRollback, cur.ResetCount, prev.ResetCount)
	case cur.ResetCount > prev.ResetCount:
		return nil
	case cur.RestartCount < prev.RestartCount:
		return fmt.Errorf("%w: restart count %d after %d", ErrRollback, cur.RestartCount, prev.RestartCount)
	case cur.Clock <= prev.Clock:
		return fmt.Errorf("%w: clock %d ms after %d ms", ErrRollback, cur.Clock, prev.Clock)
	}
	return nil
}
