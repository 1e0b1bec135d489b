package swtpm_test

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"encoding/binary"
	"math/big"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// run12 sends a TPM 1.2 command (tag TPM_TAG_RQU_COMMAND) and returns the
// response body, failing the test on a non-zero return code.
func run12(t testing.TB, tpm transport.TPM, ordinal uint32, body []byte) []byte {
	t.Helper()
	be := binary.BigEndian
	cmd := be.AppendUint16(nil, 0x00c1)
	cmd = be.AppendUint32(cmd, uint32(10+len(body)))
	cmd = be.AppendUint32(cmd, ordinal)
	rsp, err := tpm.Send(append(cmd, body...))
	if err != nil {
		t.Fatal(err)
	}
	if len(rsp) < 10 || be.Uint32(rsp[6:10]) != 0 {
		t.Fatalf("TPM 1.2 ordinal 0x%x: response %x", ordinal, rsp)
	}
	return rsp[10:]
}

// capability12 is TPM_GetCapability(capArea, subCap) without the size.
func capability12(t testing.TB, tpm transport.TPM, capArea, subCap uint32) []byte {
	t.Helper()
	be := binary.BigEndian
	body := be.AppendUint32(nil, capArea)
	body = be.AppendUint32(body, 4)
	body = be.AppendUint32(body, subCap)
	rsp := run12(t, tpm, 0x65, body)
	return rsp[4:]
}

func TestManufactureTPM12(t *testing.T) {
	ca := swtpmtest.NewCA(t)
	i, id := swtpmtest.Manufactured(t, spec.V12, ca)
	if len(id.EKs) != 1 {
		t.Fatalf("%d EKs; want 1", len(id.EKs))
	}
	ek := id.EKs[0]
	if ek.Kind != swtpm.RSA2048 || ek.NVIndex != 0x1000f000 || !bytes.Equal(ek.CertDER, ca.Issued(swtpm.RSA2048)) {
		t.Fatalf("TPM 1.2 EK %s, cert at 0x%x", ek.Kind, ek.NVIndex)
	}
	cert, err := x509.ParseCertificate(ek.CertDER)
	if err != nil {
		t.Fatal(err)
	}
	swtpmtest.Start(t, i)
	tpm := dial(t, i)

	// TPM_ReadPubek (allowed until an owner is installed) gives the EK.
	nonce := make([]byte, 20)
	rand.Read(nonce)
	rsp := run12(t, tpm, 0x7c, nonce)
	pub := parsePubek(t, rsp, nonce)
	if !pub.Equal(ek.Public) || !pub.Equal(cert.PublicKey) {
		t.Fatal("the TPM's EK differs from the identity or the certificate")
	}

	// The certificate index holds the TCG header (7 bytes) and the DER.
	nv := capability12(t, tpm, 0x11, 0x1000f000)
	if size := binary.BigEndian.Uint32(nv[len(nv)-4:]); size != uint32(len(ek.CertDER)+7) {
		t.Fatalf("NV 0x1000f000 holds %d bytes; want %d", size, len(ek.CertDER)+7)
	}

	// Enabled, activated, NV locked.
	perm := capability12(t, tpm, 0x04, 0x108)
	if perm[2] != 0 || perm[4] != 0 || perm[17] != 1 {
		t.Fatalf("permanent flags: disable %d, deactivated %d, nvLocked %d", perm[2], perm[4], perm[17])
	}
	if vol := capability12(t, tpm, 0x04, 0x109); vol[2] != 0 {
		t.Fatal("the TPM is deactivated")
	}
}

func TestManufactureAndStartTPM12(t *testing.T) {
	i := swtpmtest.Instance(t, spec.V12)
	id, p, err := swtpm.ManufactureAndStart(ctx(t), i, swtpm.ManufactureOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(ctx(t)) })
	if len(id.EKs) != 1 || id.EKs[0].NVIndex != 0 {
		t.Fatalf("identity without certifier %+v", id)
	}
	tpm := dial(t, i)
	if vol := capability12(t, tpm, 0x04, 0x109); vol[2] != 0 {
		t.Fatal("the TPM is deactivated after ManufactureAndStart")
	}
}

// parsePubek reads TPM_PUBKEY || checksum and checks the checksum.
func parsePubek(t testing.TB, b, nonce []byte) *rsa.PublicKey {
	t.Helper()
	be := binary.BigEndian
	parmSize := int(be.Uint32(b[8:12]))
	keyAt := 12 + parmSize
	n := int(be.Uint32(b[keyAt:]))
	end := keyAt + 4 + n
	sum := sha1.Sum(append(append([]byte{}, b[:end]...), nonce...))
	if !bytes.Equal(sum[:], b[end:end+20]) {
		t.Fatal("TPM_ReadPubek checksum mismatch")
	}
	return &rsa.PublicKey{N: new(big.Int).SetBytes(b[keyAt+4 : end]), E: 65537}
}
