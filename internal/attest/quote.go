package attest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/big"
	"slices"

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
// vouches for.
func VerifyQuote(ak *AK, attest, sig, nonce []byte, pcrs map[int][]byte) (*Quote, error) {
	if err := verifySignature(ak.Key, attest, sig); err != nil {
		return nil, err
	}
	a, err := tpm2.Unmarshal[tpm2.TPMSAttest](attest)
	if err != nil {
		return nil, fmt.Errorf("parsing the quote: %w", err)
	}
	if a.Magic != tpm2.TPMGeneratedValue || a.Type != tpm2.TPMSTAttestQuote {
		return nil, errors.New("the signed structure is not a TPM-generated quote")
	}
	if !bytes.Equal(a.ExtraData.Buffer, nonce) {
		return nil, ErrNonce
	}
	info, err := a.Attested.Quote()
	if err != nil {
		return nil, fmt.Errorf("parsing the quote: %w", err)
	}
	selected, err := sha256Selection(info.PCRSelect)
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	quoted := map[int][]byte{}
	for _, i := range selected {
		v, ok := pcrs[i]
		if !ok || len(v) != sha256.Size {
			return nil, fmt.Errorf("%w: PCR %d is quoted but not reported", ErrPCRDigest, i)
		}
		h.Write(v)
		quoted[i] = v
	}
	if len(pcrs) != len(selected) {
		return nil, fmt.Errorf("%w: %d PCRs reported, %d quoted", ErrPCRDigest, len(pcrs), len(selected))
	}
	if !bytes.Equal(h.Sum(nil), info.PCRDigest.Buffer) {
		return nil, ErrPCRDigest
	}
	c := a.ClockInfo
	return &Quote{Clock: c.Clock, ResetCount: c.ResetCount, RestartCount: c.RestartCount, Safe: bool(c.Safe), PCRs: quoted}, nil
}

// sha256Selection lists the PCRs a selection picks, which must all be of
// the SHA-256 bank.
func sha256Selection(sel tpm2.TPMLPCRSelection) ([]int, error) {
	var out []int
	for _, s := range sel.PCRSelections {
		if s.Hash != tpm2.TPMAlgSHA256 {
			return nil, fmt.Errorf("the quote covers the %v bank; only SHA-256 is accepted", s.Hash)
		}
		for byteIdx, b := range s.PCRSelect {
			for bit := range 8 {
				if b&(1<<bit) != 0 {
					out = append(out, byteIdx*8+bit)
				}
			}
		}
	}
	slices.Sort(out)
	return out, nil
}

func verifySignature(key crypto.PublicKey, msg, sigBytes []byte) error {
	sig, err := tpm2.Unmarshal[tpm2.TPMTSignature](sigBytes)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrSignature, err)
	}
	digest := sha256.Sum256(msg)
	switch k := key.(type) {
	case *rsa.PublicKey:
		s, err := sig.Signature.RSASSA()
		if err != nil || s.Hash != tpm2.TPMAlgSHA256 {
			return fmt.Errorf("%w: want RSASSA with SHA-256", ErrSignature)
		}
		if rsa.VerifyPKCS1v15(k, crypto.SHA256, digest[:], s.Sig.Buffer) != nil {
			return ErrSignature
		}
	case *ecdsa.PublicKey:
		s, err := sig.Signature.ECDSA()
		if err != nil || s.Hash != tpm2.TPMAlgSHA256 {
			return fmt.Errorf("%w: want ECDSA with SHA-256", ErrSignature)
		}
		r, ss := new(big.Int).SetBytes(s.SignatureR.Buffer), new(big.Int).SetBytes(s.SignatureS.Buffer)
		if !ecdsa.Verify(k, digest[:], r, ss) {
			return ErrSignature
		}
	default:
		return fmt.Errorf("%w: unsupported key %T", ErrSignature, key)
	}
	return nil
}

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
