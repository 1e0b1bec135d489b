// Package attesttest makes TPM-format attestation material in software, so
// the verifier's production path can be loaded beyond what TPMs produce.
package attesttest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/asn1"
	"math/big"

	"github.com/google/go-tpm/tpm2"
)

// AKPublic is the TPM2B_PUBLIC a TPM would give for an RSA key made from
// template (attest.RSAAKTemplate) whose public part is key's.
func AKPublic(template tpm2.TPMTPublic, key *rsa.PrivateKey) []byte {
	pub := template
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: key.N.FillBytes(make([]byte, 256))})
	return tpm2.Marshal(tpm2.New2B(pub))
}

// Quote is a TPM2_Quote of the SHA-256 PCRs pcrs with nonce, at clock,
// signed by key (RSA: RSASSA; ECDSA): the TPMS_ATTEST and TPMT_SIGNATURE.
func Quote(key crypto.Signer, nonce []byte, pcrs map[int][]byte, clock uint64) (attest, sig []byte, err error) {
	var idx []uint
	h := sha256.New()
	for i := range 24 {
		if v, ok := pcrs[i]; ok {
			idx = append(idx, uint(i))
			h.Write(v)
		}
	}
	a := tpm2.TPMSAttest{
		Magic: tpm2.TPMGeneratedValue, Type: tpm2.TPMSTAttestQuote,
		ExtraData: tpm2.TPM2BData{Buffer: nonce},
		ClockInfo: tpm2.TPMSClockInfo{Clock: clock, ResetCount: 1, Safe: true},
		Attested: tpm2.NewTPMUAttest(tpm2.TPMSTAttestQuote, &tpm2.TPMSQuoteInfo{
			PCRSelect: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(idx...)}}},
			PCRDigest: tpm2.TPM2BDigest{Buffer: h.Sum(nil)},
		}),
	}
	attest = tpm2.Marshal(a)
	digest := sha256.Sum256(attest)
	raw, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return nil, nil, err
	}
	var s tpm2.TPMTSignature
	switch key.(type) {
	case *rsa.PrivateKey:
		s = tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgRSASSA, Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgRSASSA,
			&tpm2.TPMSSignatureRSA{Hash: tpm2.TPMAlgSHA256, Sig: tpm2.TPM2BPublicKeyRSA{Buffer: raw}})}
	case *ecdsa.PrivateKey:
		var rs struct{ R, S *big.Int }
		if _, err := asn1.Unmarshal(raw, &rs); err != nil {
			return nil, nil, err
		}
		s = tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgECDSA, Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA,
			&tpm2.TPMSSignatureECC{Hash: tpm2.TPMAlgSHA256, SignatureR: tpm2.TPM2BECCParameter{Buffer: rs.R.Bytes()},
				SignatureS: tpm2.TPM2BECCParameter{Buffer: rs.S.Bytes()}})}
	}
	return attest, tpm2.Marshal(s), nil
}
