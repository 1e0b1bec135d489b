// Package attesttest makes TPM-format attestation material in software, so
// the verifier's production path can be loaded beyond what TPMs produce.
package attesttest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/binary"
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

// ECCAKPublic is the TPM2B_PUBLIC a TPM would give for a restricted
// ECDSA (SHA-256) signing key on NIST P-256, as guest agents may make
// their AK, whose public part is key's.
func ECCAKPublic(key *ecdsa.PublicKey) []byte {
	point, err := key.Bytes() // 0x04 || X || Y
	if err != nil || len(point) != 65 {
		panic("attesttest: not a P-256 key")
	}
	pub := tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true,
			Restricted: true, SignEncrypt: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
			CurveID: tpm2.TPMECCNistP256,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: point[1:33]}, Y: tpm2.TPM2BECCParameter{Buffer: point[33:]}}),
	}
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

// Measurement is one event of a boot a test makes up: Data is measured
// (its SHA-256 extends PCR) and logged with Type.
type Measurement struct {
	PCR  int
	Type uint32
	Data []byte
}

// EventLog is the crypto-agile event log (SHA-256 only) of ms, as firmware
// writes it, and the PCR values it replays to; a TPM extended with the
// same measurements holds those values.
func EventLog(ms []Measurement) (log []byte, pcrs map[int][]byte) {
	le := binary.LittleEndian
	spec := append([]byte("Spec ID Event03\x00"), 0, 0, 0, 0, 0, 2, 0, 2) // platform class, 2.0, errata 0, uintn 8 bytes
	spec = le.AppendUint32(spec, 1)
	spec = le.AppendUint16(le.AppendUint16(spec, uint16(tpm2.TPMAlgSHA256)), sha256.Size)
	spec = append(spec, 0)                            // no vendor info
	log = le.AppendUint32(le.AppendUint32(nil, 0), 3) // PCR 0, EV_NO_ACTION
	log = append(log, make([]byte, sha1Size)...)
	log = append(le.AppendUint32(log, uint32(len(spec))), spec...)
	pcrs = map[int][]byte{}
	for _, m := range ms {
		d := sha256.Sum256(m.Data)
		log = le.AppendUint32(le.AppendUint32(log, uint32(m.PCR)), m.Type)
		log = le.AppendUint16(le.AppendUint32(log, 1), uint16(tpm2.TPMAlgSHA256))
		log = append(log, d[:]...)
		log = append(le.AppendUint32(log, uint32(len(m.Data))), m.Data...)
		prev, ok := pcrs[m.PCR]
		if !ok {
			prev = make([]byte, sha256.Size)
		}
		next := sha256.Sum256(append(prev, d[:]...))
		pcrs[m.PCR] = next[:]
	}
	return log, pcrs
}

const sha1Size = 20

// IMAFile is one measurement of an IMA log a test makes up.
type IMAFile struct {
	Path      string
	Content   []byte
	Violation bool // IMA could not measure it reliably
}

// IMALog is the kernel's binary IMA log (ima-ng template, SHA-256 file
// digests) of files, and what each entry extends into the SHA-256 bank of
// PCR 10, in order.
func IMALog(files []IMAFile) (log []byte, extends [][]byte) {
	le := binary.LittleEndian
	for _, f := range files {
		digest := sha256.Sum256(f.Content)
		dng := append([]byte("sha256:\x00"), digest[:]...)
		nng := append([]byte(f.Path), 0)
		data := append(le.AppendUint32(nil, uint32(len(dng))), dng...)
		data = append(le.AppendUint32(data, uint32(len(nng))), nng...)
		sha1 := sha1.Sum(data)
		extend := sha256.Sum256(data)
		if f.Violation {
			sha1 = [20]byte{}
			copy(extend[:], bytes.Repeat([]byte{0xff}, sha256.Size))
		}
		log = append(le.AppendUint32(log, 10), sha1[:]...)
		log = append(le.AppendUint32(log, uint32(len("ima-ng"))), "ima-ng"...)
		log = append(le.AppendUint32(log, uint32(len(data))), data...)
		extends = append(extends, extend[:])
	}
	return log, extends
}
