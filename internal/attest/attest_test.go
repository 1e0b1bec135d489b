package attest

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// guestTPM is a vTPM manufactured the way vtpmd makes them, running, with a
// client on its data socket: the TPM a guest agent would see.
func guestTPM(t *testing.T) (transport.TPM, *swtpm.Identity) {
	t.Helper()
	swtpmtest.Require(t)
	i, id := swtpmtest.Manufactured(t, spec.V20, nil)
	swtpmtest.Start(t, i)
	conn, err := net.Dial("unix", i.DataSocket())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(2 * time.Minute))
	return swtpm.Retrying(transport.FromReadWriter(conn)), id
}

// akTemplates are restricted signing keys, as the guest agent makes them.
var akTemplates = map[string]tpm2.TPMTPublic{
	"rsa": RSAAKTemplate,
	"ecc": {
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true,
			Restricted: true, SignEncrypt: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
			CurveID: tpm2.TPMECCNistP256,
		}),
	},
}

// createKey makes a primary key from template in the owner hierarchy and
// returns its handle and TPM2B_PUBLIC bytes.
func createKey(t *testing.T, tpm transport.TPM, template tpm2.TPMTPublic) (tpm2.NamedHandle, []byte) {
	t.Helper()
	rsp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(template)}.Execute(tpm)
	if err != nil {
		t.Fatalf("CreatePrimary: %v", err)
	}
	t.Cleanup(func() { tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(tpm) })
	return tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, tpm2.Marshal(rsp.OutPublic)
}

func quote(t *testing.T, tpm transport.TPM, ak tpm2.NamedHandle, nonce []byte, pcrs []uint) (attest, sig []byte, values map[int][]byte) {
	t.Helper()
	sel := tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(pcrs...)}}}
	q, err := tpm2.Quote{SignHandle: ak, QualifyingData: tpm2.TPM2BData{Buffer: nonce},
		InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull}, PCRSelect: sel}.Execute(tpm)
	if err != nil {
		t.Fatalf("Quote: %v", err)
	}
	values = map[int][]byte{}
	for _, i := range pcrs {
		r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
			{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(i)}}}}.Execute(tpm)
		if err != nil {
			t.Fatal(err)
		}
		values[int(i)] = r.PCRValues.Digests[0].Buffer
	}
	return q.Quoted.Bytes(), tpm2.Marshal(q.Signature), values
}

func TestCredentialActivationAndQuote(t *testing.T) {
	for name, template := range akTemplates {
		t.Run(name, func(t *testing.T) { testActivationAndQuote(t, template) })
	}
}

func testActivationAndQuote(t *testing.T, template tpm2.TPMTPublic) {
	tpm, id := guestTPM(t)
	akHandle, akPublic := createKey(t, tpm, template)
	ak, err := ParseAK(akPublic)
	if err != nil {
		t.Fatal(err)
	}

	// The registrar's challenge, opened by the TPM that holds the EK, for
	// this AK only.
	for _, ek := range id.EKs {
		ch, err := NewChallenge(ek.Public, ak, nil)
		if err != nil {
			t.Fatalf("%s: %v", ek.Kind, err)
		}
		got := activate(t, tpm, akHandle, ek.Handle, ch)
		if !ch.Answer(got) {
			t.Fatalf("%s: the TPM gave back another secret", ek.Kind)
		}
		wrong := bytes.Clone(got)
		wrong[0] ^= 1 // (setting a byte to a fixed value left it right one time in 256)
		if ch.Answer(wrong) {
			t.Fatal("a wrong answer was accepted")
		}
	}

	// A quote verifies with its nonce and PCR values, and fails without.
	pcrs := []uint{0, 1, 2, 3, 4, 5, 6, 7, 16}
	nonce := bytes.Repeat([]byte{7}, 32)
	attest, sig, values := quote(t, tpm, akHandle, nonce, pcrs)
	q1, err := VerifyQuote(ak, attest, sig, nonce, values)
	if err != nil {
		t.Fatal(err)
	}
	if len(q1.PCRs) != len(pcrs) {
		t.Fatalf("quote covers %d PCRs", len(q1.PCRs))
	}
	if _, err := VerifyQuote(ak, attest, sig, bytes.Repeat([]byte{8}, 32), values); !errors.Is(err, ErrNonce) {
		t.Fatalf("other nonce: %v", err)
	}
	forged := map[int][]byte{}
	for k, v := range values {
		forged[k] = v
	}
	forged[16] = bytes.Repeat([]byte{0xff}, sha256.Size)
	if _, err := VerifyQuote(ak, attest, sig, nonce, forged); !errors.Is(err, ErrPCRDigest) {
		t.Fatalf("forged PCR 16: %v", err)
	}
	delete(forged, 16)
	if _, err := VerifyQuote(ak, attest, sig, nonce, forged); !errors.Is(err, ErrPCRDigest) {
		t.Fatalf("PCR 16 left out: %v", err)
	}
	tampered := bytes.Clone(attest)
	tampered[len(tampered)-1] ^= 1
	if _, err := VerifyQuote(ak, tampered, sig, nonce, values); !errors.Is(err, ErrSignature) {
		t.Fatalf("tampered quote: %v", err)
	}

	// A quote signed by another key of the same TPM is refused.
	otherHandle, otherPublic := createKey(t, tpm, rsaAKWithUnique(template))
	other, err := ParseAK(otherPublic)
	if err != nil {
		t.Fatal(err)
	}
	oa, os, ov := quote(t, tpm, otherHandle, nonce, pcrs)
	if _, err := VerifyQuote(ak, oa, os, nonce, ov); !errors.Is(err, ErrSignature) {
		t.Fatalf("quote by another key: %v", err)
	}
	if _, err := VerifyQuote(other, oa, os, nonce, ov); err != nil {
		t.Fatal(err)
	}

	// Time moves on: a later quote follows; the older one replayed does not.
	if _, err := (tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: 16, Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}}}}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Millisecond)
	attest2, sig2, values2 := quote(t, tpm, akHandle, nonce, pcrs)
	q2, err := VerifyQuote(ak, attest2, sig2, nonce, values2)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(q1.PCRs[16], q2.PCRs[16]) {
		t.Fatal("PCR 16 did not change after the extend")
	}
	if err := CheckProgress(q1, q2); err != nil {
		t.Fatal(err)
	}
	if err := CheckProgress(q2, q1); !errors.Is(err, ErrRollback) {
		t.Fatalf("replayed older quote: %v", err)
	}
}

// rsaAKWithUnique is template with a distinct unique field, so that
// CreatePrimary makes a second, different key.
func rsaAKWithUnique(template tpm2.TPMTPublic) tpm2.TPMTPublic {
	if template.Type == tpm2.TPMAlgRSA {
		template.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: []byte("other")})
	} else {
		template.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{X: tpm2.TPM2BECCParameter{Buffer: []byte("other")}})
	}
	return template
}

// activate runs TPM2_ActivateCredential as the guest agent does: the AK
// with its (empty) password, the EK with the TCG EK policy
// (PolicySecret of the endorsement hierarchy).
func activate(t *testing.T, tpm transport.TPM, ak tpm2.NamedHandle, ekHandle uint32, ch *Challenge) []byte {
	t.Helper()
	rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(ekHandle)}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	policy := tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tpm transport.TPM, handle tpm2.TPMISHPolicy, nonceTPM tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicySecret{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
			PolicySession: handle, NonceTPM: nonceTPM}.Execute(tpm)
		return err
	})
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: ak.Handle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle:      tpm2.AuthHandle{Handle: tpm2.TPMHandle(ekHandle), Name: rp.Name, Auth: policy},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: ch.CredentialBlob},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: ch.EncryptedSeed},
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("ActivateCredential with EK 0x%x: %v", ekHandle, err)
	}
	return rsp.CertInfo.Buffer
}

func TestParseAKRefusesNonAKs(t *testing.T) {
	tpm, _ := guestTPM(t)
	_, good := createKey(t, tpm, akTemplates["rsa"])
	b, _ := tpm2.Unmarshal[tpm2.TPM2BPublic](good)
	real, _ := b.Contents()
	for name, mutate := range map[string]func(*tpm2.TPMTPublic){
		"not restricted":          func(p *tpm2.TPMTPublic) { p.ObjectAttributes.Restricted = false },
		"decrypt":                 func(p *tpm2.TPMTPublic) { p.ObjectAttributes.Decrypt = true },
		"not sign":                func(p *tpm2.TPMTPublic) { p.ObjectAttributes.SignEncrypt = false },
		"not fixedTPM":            func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedTPM = false },
		"not fixedParent":         func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedParent = false },
		"not sensitiveDataOrigin": func(p *tpm2.TPMTPublic) { p.ObjectAttributes.SensitiveDataOrigin = false },
		"SHA-1 name":              func(p *tpm2.TPMTPublic) { p.NameAlg = tpm2.TPMAlgSHA1 },
	} {
		p := *real
		mutate(&p)
		if _, err := ParseAK(tpm2.Marshal(tpm2.New2B(p))); err == nil {
			t.Fatalf("%s: accepted as an AK", name)
		}
	}
	if _, err := ParseAK(good); err != nil {
		t.Fatalf("the real AK: %v", err)
	}
	if _, err := ParseAK([]byte{0, 1, 2}); err == nil {
		t.Fatal("garbage accepted as an AK")
	}
}
