package swtpm

import (
	"context"
	"crypto"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/ctrl"
)

// EKKind names an endorsement key type.
type EKKind string

// The EKs vtpmd creates.
const (
	RSA2048 EKKind = "rsa2048"
	ECCP256 EKKind = "ecc-nist-p256"
)

// TCG handles (TCG EK Credential Profile 2.0, section 2.2.1.4): persistent
// EK handles as swtpm_setup uses them, and the NV indices of the EK
// certificates.
const (
	RSAEKHandle  = 0x81010001
	ECCEKHandle  = 0x81010016
	RSAEKCertNV  = 0x01c00002
	ECCEKCertNV  = 0x01c00016
	nvChunk      = 1024 // at most MAX_NV_BUFFER_SIZE per NV_Write
	stateFileV20 = "tpm2-00.permall"
	stateFileV12 = "tpm-00.permall"
)

// EK is an endorsement key of a manufactured TPM.
type EK struct {
	Kind    EKKind
	Handle  uint32 // persistent handle (0 for TPM 1.2)
	NVIndex uint32 // where the certificate is (0 if not in NV)
	Public  crypto.PublicKey
	CertDER []byte
}

// Identity is a manufactured TPM's public identity.
type Identity struct{ EKs []EK }

// ManufactureOptions configure Manufacture.
type ManufactureOptions struct {
	// Certify issues the certificate of an EK; nil leaves EKs uncertified.
	Certify func(ctx context.Context, kind EKKind, pub crypto.PublicKey) ([]byte, error)
	// PCRBanks to allocate in a TPM 2.0; default {"sha256"}.
	PCRBanks []string
	Log      *slog.Logger
}

// Manufacture makes a brand-new TPM in i.Dir, which must hold no TPM state
// yet, and returns its identity and the swtpm process, left running and
// ready for clients, so that a new vTPM costs one process start. Every
// change is on disk (encrypted) when it returns.
//
// TPM 2.0: the PCR banks are allocated and the TPM reset through the
// control channel so that the allocation takes effect; the RSA-2048 and ECC
// P-256 EKs are created inside the TPM from the TCG default templates and
// made persistent; their certificates go into NV 0x01c00002 and 0x01c00016,
// defined in the platform hierarchy and write-locked as swtpm_setup
// --lock-nvram does.
//
// TPM 1.2: the EK is created by TPM_CreateEndorsementKeyPair and certified;
// its certificate is returned (for the API) but not written into the TPM's
// NV, which needs physical-presence commands vtpmd does not issue yet.
func Manufacture(ctx context.Context, i Instance, opts ManufactureOptions) (*Identity, *Process, error) {
	for _, f := range []string{stateFileV20, stateFileV12} {
		if _, err := os.Stat(filepath.Join(i.Dir, f)); err == nil {
			return nil, nil, fmt.Errorf("manufacturing in %s: a TPM state exists already", i.Dir)
		}
	}
	p, err := Start(ctx, i, opts.Log)
	if err != nil {
		return nil, nil, err
	}
	id, err := manufacture(ctx, i, opts)
	if err != nil {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		p.Stop(sctx)
		return nil, nil, fmt.Errorf("manufacturing in %s: %w", i.Dir, err)
	}
	return id, p, nil
}

func manufacture(ctx context.Context, i Instance, opts ManufactureOptions) (*Identity, error) {
	conn, err := net.Dial("unix", i.DataSocket())
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	tpm := Retrying(transport.FromReadWriter(conn))
	if i.Version == spec.V12 {
		id, err := manufacture12(ctx, tpm, opts)
		if err != nil {
			return nil, err
		}
		// Activation takes effect at the next reset.
		if err := reset(i); err != nil {
			return nil, err
		}
		return id, startup12(tpm)
	}

	banks := opts.PCRBanks
	if len(banks) == 0 {
		banks = []string{"sha256"}
	}
	if err := allocatePCRs(tpm, banks); err != nil {
		return nil, err
	}
	// A reset applies the allocation: swtpm re-initialises libtpms in place
	// (no process restart), then the TPM is started again.
	if err := reset(i); err != nil {
		return nil, err
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil && !errors.Is(err, tpm2.TPMRCInitialize) {
		return nil, fmt.Errorf("TPM2_Startup after PCR allocation: %w", err)
	}

	id := &Identity{}
	for _, k := range []struct {
		kind     EKKind
		template tpm2.TPMTPublic
		handle   uint32
		nv       uint32
	}{
		{RSA2048, tpm2.RSAEKTemplate, RSAEKHandle, RSAEKCertNV},
		{ECCP256, tpm2.ECCEKTemplate, ECCEKHandle, ECCEKCertNV},
	} {
		pub, err := createEK(tpm, k.template, k.handle)
		if err != nil {
			return nil, fmt.Errorf("creating %s EK: %w", k.kind, err)
		}
		ek := EK{Kind: k.kind, Handle: k.handle, Public: pub}
		if opts.Certify != nil {
			if ek.CertDER, err = opts.Certify(ctx, k.kind, pub); err != nil {
				return nil, fmt.Errorf("certifying %s EK: %w", k.kind, err)
			}
			if err := writeLockedNV(tpm, k.nv, ek.CertDER); err != nil {
				return nil, fmt.Errorf("storing %s EK certificate: %w", k.kind, err)
			}
			ek.NVIndex = k.nv
		}
		id.EKs = append(id.EKs, ek)
	}
	return id, nil
}

// reset re-initialises the TPM through the control channel, as a machine
// reset would. Only for a TPM no guest uses: it discards volatile state.
func reset(i Instance) error {
	c, err := ctrl.Dial(i.CtrlSocket())
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Init(0)
}

// createEK creates an EK in the endorsement hierarchy and makes it
// persistent at handle.
func createEK(tpm transport.TPM, template tpm2.TPMTPublic, handle uint32) (crypto.PublicKey, error) {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHEndorsement,
		InPublic:      tpm2.New2B(template),
	}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	defer tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(tpm)
	_, err = tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name},
		PersistentHandle: tpm2.TPMHandle(handle),
	}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("making EK persistent: %w", err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return nil, err
	}
	return tpm2.Pub(*pub)
}

// writeLockedNV stores data in a platform-created NV index that anyone may
// read and nobody may change after the write lock (what swtpm_setup does
// for EK certificates).
func writeLockedNV(tpm transport.TPM, index uint32, data []byte) error {
	pub := tpm2.TPMSNVPublic{
		NVIndex: tpm2.TPMHandle(index),
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{
			PPWrite: true, WriteDefine: true, PPRead: true, OwnerRead: true, AuthRead: true,
			NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary,
		},
		DataSize: uint16(len(data)),
	}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHPlatform, PublicInfo: tpm2.New2B(pub)}).Execute(tpm); err != nil {
		return fmt.Errorf("NV_DefineSpace 0x%x: %w", index, err)
	}
	name, err := tpm2.NVName(&pub)
	if err != nil {
		return err
	}
	nv := tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: *name}
	for off := 0; off < len(data); off += nvChunk {
		chunk := data[off:min(off+nvChunk, len(data))]
		if _, err := (tpm2.NVWrite{AuthHandle: tpm2.TPMRHPlatform, NVIndex: nv,
			Data: tpm2.TPM2BMaxNVBuffer{Buffer: chunk}, Offset: uint16(off)}).Execute(tpm); err != nil {
			return fmt.Errorf("NV_Write 0x%x: %w", index, err)
		}
	}
	// The name changes once written; read it back for the lock.
	rp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(tpm)
	if err != nil {
		return err
	}
	nv.Name = rp.NVName
	if _, err := (tpm2.NVWriteLock{AuthHandle: tpm2.TPMRHPlatform, NVIndex: nv}).Execute(tpm); err != nil {
		return fmt.Errorf("NV_WriteLock 0x%x: %w", index, err)
	}
	return nil
}

var bankAlgs = map[string]tpm2.TPMAlgID{
	"sha1": tpm2.TPMAlgSHA1, "sha256": tpm2.TPMAlgSHA256, "sha384": tpm2.TPMAlgSHA384, "sha512": tpm2.TPMAlgSHA512,
}

// allocatePCRs activates exactly the given banks (all 24 PCRs each) with
// TPM2_PCR_Allocate, which go-tpm does not wrap, so it is marshalled here
// (TPM 2.0 Part 3, 22.5). It takes effect at the TPM's next start.
func allocatePCRs(tpm transport.TPM, banks []string) error {
	want := map[tpm2.TPMAlgID]bool{}
	for _, b := range banks {
		alg, ok := bankAlgs[b]
		if !ok {
			return fmt.Errorf("unknown PCR bank %q", b)
		}
		want[alg] = true
	}
	be := binary.BigEndian
	var body []byte
	body = be.AppendUint32(body, uint32(tpm2.TPMRHPlatform))
	// Password session with empty auth: handle, nonce(0), attributes, hmac(0).
	body = be.AppendUint32(body, 9)
	body = be.AppendUint32(body, uint32(tpm2.TPMRSPW))
	body = append(body, 0, 0, 0, 0, 0)
	algs := []tpm2.TPMAlgID{tpm2.TPMAlgSHA1, tpm2.TPMAlgSHA256, tpm2.TPMAlgSHA384, tpm2.TPMAlgSHA512}
	body = be.AppendUint32(body, uint32(len(algs)))
	for _, a := range algs {
		body = be.AppendUint16(body, uint16(a))
		body = append(body, 3)
		if want[a] {
			body = append(body, 0xff, 0xff, 0xff)
		} else {
			body = append(body, 0, 0, 0)
		}
	}
	cmd := be.AppendUint16(nil, uint16(tpm2.TPMSTSessions))
	cmd = be.AppendUint32(cmd, uint32(10+len(body)))
	cmd = be.AppendUint32(cmd, uint32(tpm2.TPMCCPCRAllocate))
	rsp, err := tpm.Send(append(cmd, body...))
	if err != nil {
		return fmt.Errorf("TPM2_PCR_Allocate: %w", err)
	}
	if len(rsp) < 10 {
		return errors.New("TPM2_PCR_Allocate: short response")
	}
	if rc := be.Uint32(rsp[6:10]); rc != 0 {
		return fmt.Errorf("TPM2_PCR_Allocate: %w", tpm2.TPMRC(rc))
	}
	return nil
}

// Retrying wraps a TPM transport so that commands answered with
// TPM_RC_RETRY (which a freshly started swtpm returns once) are re-sent.
func Retrying(t transport.TPM) transport.TPM { return retrying{t} }

type retrying struct{ t transport.TPM }

func (r retrying) Send(cmd []byte) ([]byte, error) {
	for try := 0; ; try++ {
		rsp, err := r.t.Send(cmd)
		if err != nil || try == 10 || len(rsp) < 10 || tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:10])) != tpm2.TPMRCRetry {
			return rsp, err
		}
		time.Sleep(time.Millisecond << try)
	}
}
