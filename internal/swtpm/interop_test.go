package swtpm_test

import (
	"bytes"
	"crypto/x509"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpmutil"

	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// TestEKCertificatesWhereOtherToolsLook checks a vTPM vtpmd made with two
// independent TPM clients: tpm2_getekcertificate (tpm2-tools) and
// go-attestation each find both EK certificates, the P-256 one at 0x01c0000a.
func TestEKCertificatesWhereOtherToolsLook(t *testing.T) {
	swtpmtest.Require(t, "tpm2_getekcertificate")
	ca := swtpmtest.NewCA(t)
	i, _ := swtpmtest.Manufactured(t, spec.V20, ca)
	swtpmtest.Start(t, i)

	dir := t.TempDir()
	rsaPath, eccPath := filepath.Join(dir, "rsa.der"), filepath.Join(dir, "ecc.der")
	cmd := exec.Command("tpm2_getekcertificate", "-o", rsaPath, "-o", eccPath)
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=swtpm:path="+i.DataSocket())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tpm2_getekcertificate: %v\n%s", err, out)
	}
	for kind, path := range map[swtpm.EKKind]string{swtpm.RSA2048: rsaPath, swtpm.ECCP256: eccPath} {
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, ca.Issued(kind)) {
			t.Errorf("tpm2_getekcertificate's %s certificate is not the one vtpmd issued", kind)
		}
	}

	rwc, err := tpmutil.OpenTPM(i.DataSocket())
	if err != nil {
		t.Fatal(err)
	}
	tpm, err := attest.OpenTPM(&attest.OpenConfig{CommandChannel: noLog{rwc}})
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	eks, err := tpm.EKCertificates()
	if err != nil {
		t.Fatalf("go-attestation: %v", err)
	}
	found := map[swtpm.EKKind]bool{}
	for _, ek := range eks {
		for _, kind := range []swtpm.EKKind{swtpm.RSA2048, swtpm.ECCP256} {
			if bytes.Equal(ek.Certificate.Raw, ca.Issued(kind)) {
				found[kind] = true
			}
		}
	}
	if !found[swtpm.RSA2048] || !found[swtpm.ECCP256] {
		t.Fatalf("go-attestation found the EK certificates %v of {rsa2048, ecc-nist-p256}", found)
	}
}

// noLog is a go-attestation command channel without a measurement log.
type noLog struct{ io.ReadWriteCloser }

func (noLog) MeasurementLog() ([]byte, error) { return nil, nil }

// TestIdentifyReadsSwtpmSetupECCIndex: a vTPM whose ECC EK and certificate
// are where swtpm_setup (and older vtpmd) put them, 0x81010016 and
// 0x01c00016, is still identified whole.
func TestIdentifyReadsSwtpmSetupECCIndex(t *testing.T) {
	ca := swtpmtest.NewCA(t)
	i, id := swtpmtest.Manufactured(t, spec.V20, ca)
	ecc := id.EKs[1]
	p := swtpmtest.Start(t, i)
	tpm := dial(t, i)
	moveECCEK(t, tpm, ecc.CertDER)
	tpm.(transport.TPMCloser).Close()
	if err := p.Stop(ctx(t)); err != nil {
		t.Fatal(err)
	}

	got, err := swtpm.Identify(ctx(t), i.Dir, swtpmtest.Dir(t), i.Secret, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.EKs) != 2 {
		t.Fatalf("%d EKs; want 2", len(got.EKs))
	}
	e := got.EKs[1]
	if e.Kind != swtpm.ECCP256 || e.Handle != swtpm.SwtpmSetupECCEKHandle || e.NVIndex != swtpm.SwtpmSetupECCEKCertNV ||
		!bytes.Equal(e.CertDER, ecc.CertDER) || !equalKeys(e.Public, ecc.Public) {
		t.Fatalf("ECC EK %s at 0x%08x, certificate at 0x%08x; want the manufactured one at 0x%08x, 0x%08x",
			e.Kind, e.Handle, e.NVIndex, swtpm.SwtpmSetupECCEKHandle, swtpm.SwtpmSetupECCEKCertNV)
	}
}

// moveECCEK rearranges a vTPM as swtpm_setup leaves it: the ECC EK
// persistent at 0x81010016 and its certificate at 0x01c00016 (platform
// authorisation is empty after every TPM2_Startup).
func moveECCEK(t *testing.T, tpm transport.TPM, cert []byte) {
	t.Helper()
	rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(swtpm.ECCEKHandle)}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.EvictControl{Auth: tpm2.TPMRHOwner, ObjectHandle: tpm2.NamedHandle{Handle: tpm2.TPMHandle(swtpm.ECCEKHandle), Name: rp.Name},
		PersistentHandle: tpm2.TPMHandle(swtpm.ECCEKHandle)}).Execute(tpm); err != nil {
		t.Fatalf("evicting the ECC EK: %v", err)
	}
	cp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tpm2.ECCEKTemplate)}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.EvictControl{Auth: tpm2.TPMRHOwner, ObjectHandle: tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
		PersistentHandle: tpm2.TPMHandle(swtpm.SwtpmSetupECCEKHandle)}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	tpm2.FlushContext{FlushHandle: cp.ObjectHandle}.Execute(tpm)

	nvp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(swtpm.ECCEKCertNV)}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.NVUndefineSpace{AuthHandle: tpm2.TPMRHPlatform,
		NVIndex: tpm2.NamedHandle{Handle: tpm2.TPMHandle(swtpm.ECCEKCertNV), Name: nvp.NVName}}).Execute(tpm); err != nil {
		t.Fatalf("undefining 0x%08x: %v", swtpm.ECCEKCertNV, err)
	}
	pub := tpm2.TPMSNVPublic{NVIndex: tpm2.TPMHandle(swtpm.SwtpmSetupECCEKCertNV), NameAlg: tpm2.TPMAlgSHA256, DataSize: uint16(len(cert)),
		Attributes: tpm2.TPMANV{PPWrite: true, PPRead: true, OwnerRead: true, AuthRead: true, NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary}}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHPlatform, PublicInfo: tpm2.New2B(pub)}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	name := nameOf(t, &pub)
	for off := 0; off < len(cert); off += 1024 {
		chunk := cert[off:min(off+1024, len(cert))]
		if _, err := (tpm2.NVWrite{AuthHandle: tpm2.TPMRHPlatform, NVIndex: tpm2.NamedHandle{Handle: pub.NVIndex, Name: name},
			Data: tpm2.TPM2BMaxNVBuffer{Buffer: chunk}, Offset: uint16(off)}).Execute(tpm); err != nil {
			t.Fatal(err)
		}
		pub.Attributes.Written = true
		name = nameOf(t, &pub)
	}
	if _, err := x509.ParseCertificate(cert); err != nil {
		t.Fatal(err)
	}
}
