package main

import (
	"crypto/sha256"
	"crypto/x509"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
)

// What printTPM reads: the RSA EK (persistent handle and certificate NV
// index of the TCG EK Credential Profile, section 2.2.1) and the NV
// indices the tests write through the vTPM before moving it (a 32-byte
// index and a counter).
const (
	rsaEKHandle   = 0x81010001
	rsaEKCertNV   = 0x01c00002
	testDataNV    = 0x01500016
	testCounterNV = 0x01500017
)

// printTPM prints, from the guest's side of its TPM, what makes the TPM
// the vTPM's: "TPM EK sha256=<hex>" (of the RSA EK's PKIX public key),
// "TPM EKCERT sha256=<hex>" (of its certificate), and "TPM NV
// 0x<index>=<hex>" for each test index defined; "TPM error ..." for what
// cannot be read.
func printTPM() {
	tpm, err := linuxtpm.Open("/dev/tpmrm0")
	if err != nil {
		fmt.Printf("TPM error %v\n", err)
		return
	}
	defer tpm.Close()
	if der, err := ekPublic(tpm); err != nil {
		fmt.Printf("TPM error EK: %v\n", err)
	} else {
		fmt.Printf("TPM EK sha256=%x\n", sha256.Sum256(der))
	}
	if cert, err := nvRead(tpm, rsaEKCertNV); err != nil {
		fmt.Printf("TPM error EK certificate: %v\n", err)
	} else {
		fmt.Printf("TPM EKCERT sha256=%x\n", sha256.Sum256(cert))
	}
	for _, index := range []uint32{testDataNV, testCounterNV} {
		if data, err := nvRead(tpm, index); err == nil {
			fmt.Printf("TPM NV 0x%x=%x\n", index, data)
		}
	}
}

func ekPublic(tpm transport.TPM) ([]byte, error) {
	rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(rsaEKHandle)}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	pub, err := rp.OutPublic.Contents()
	if err != nil {
		return nil, err
	}
	key, err := tpm2.Pub(*pub)
	if err != nil {
		return nil, err
	}
	return x509.MarshalPKIXPublicKey(key)
}

// nvRead reads NV index whole with owner authorization, in pieces a TPM
// returns (TPM2_NV_Read, TPM 2.0 Part 3 section 31.13).
func nvRead(tpm transport.TPM, index uint32) ([]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	contents, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, err
	}
	owner := tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	nv := tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: pub.NVName}
	var out []byte
	for off := uint16(0); off < contents.DataSize; {
		n := min(contents.DataSize-off, 512)
		r, err := tpm2.NVRead{AuthHandle: owner, NVIndex: nv, Size: n, Offset: off}.Execute(tpm)
		if err != nil {
			return nil, err
		}
		out = append(out, r.Data.Buffer...)
		off += n
	}
	return out, nil
}
