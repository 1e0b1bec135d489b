package swtpm

import (
	"context"
	"crypto"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// manufacture20 makes a fresh TPM 2.0 (started by swtpm) into a vTPM: EKs,
// their certificates in NV, PCR banks. See Manufacture.
func manufacture20(ctx context.Context, tpm transport.TPM, certify func(context.Context, EKKind, crypto.PublicKey) ([]byte, error),
	banks []tpm2.TPMAlgID, sw *stopwatch) (*Identity, error) {
	if err := allocatePCRs(tpm, banks); err != nil {
		return nil, err
	}
	sw.lap("pcr_allocate")
	eks := []struct {
		EK
		template tpm2.TPMTPublic
		cert     func() ([]byte, error)
	}{
		{EK: EK{Kind: RSA2048, Handle: RSAEKHandle, NVIndex: RSAEKCertNV}, template: tpm2.RSAEKTemplate},
		{EK: EK{Kind: ECCP256, Handle: ECCEKHandle, NVIndex: ECCEKCertNV}, template: tpm2.ECCEKTemplate},
	}
	// Each EK is certified while the TPM makes the next one.
	for n := range eks {
		ek := &eks[n]
		pub, err := createEK(tpm, ek.template, ek.Handle)
		if err != nil {
			return nil, fmt.Errorf("creating the %s EK: %w", ek.Kind, err)
		}
		ek.Public = pub
		ek.cert = certifyAsync(ctx, certify, ek.Kind, pub)
		sw.lap("ek_" + string(ek.Kind))
	}
	id := &Identity{}
	var errs []error
	for n := range eks {
		ek := &eks[n]
		der, err := ek.cert() // always wait: no certifier outlives Manufacture
		sw.lap("certify_wait_" + string(ek.Kind))
		if err != nil || len(errs) > 0 {
			errs = append(errs, err)
			continue
		}
		if der == nil {
			ek.NVIndex = 0
		} else if err := writeLockedNV(tpm, ek.NVIndex, der); err != nil {
			errs = append(errs, fmt.Errorf("storing the %s EK certificate: %w", ek.Kind, err))
			continue
		}
		sw.lap("nv_" + string(ek.Kind))
		ek.CertDER = der
		id.EKs = append(id.EKs, ek.EK)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return id, nil
}

// createEK creates an EK in the endorsement hierarchy from template and
// makes it persistent at handle, as swtpm_setup does (owner authorisation).
func createEK(tpm transport.TPM, template tpm2.TPMTPublic, handle uint32) (crypto.PublicKey, error) {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHEndorsement,
		InPublic:      tpm2.New2B(template),
	}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	flush := tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}
	_, err = tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name},
		PersistentHandle: tpm2.TPMHandle(handle),
	}.Execute(tpm)
	if err != nil {
		flush.Execute(tpm)
		return nil, fmt.Errorf("making the EK persistent: %w", err)
	}
	if _, err := flush.Execute(tpm); err != nil {
		return nil, fmt.Errorf("flushing the transient EK: %w", err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return nil, err
	}
	return tpm2.Pub(*pub)
}

// nvChunk is what one TPM2_NV_Write carries: libtpms's MAX_NV_BUFFER_SIZE.
const nvChunk = 1024

// ekCertNVAttributes are swtpm_setup's attributes for EK certificate
// indices: created with platform authorisation, written only with it,
// readable by platform, owner and anyone with the index's (empty) auth, no
// DA, and lockable for good with TPM2_NV_WriteLock.
var ekCertNVAttributes = tpm2.TPMANV{
	PPWrite: true, WriteDefine: true, PPRead: true, OwnerRead: true, AuthRead: true,
	NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary,
}

// writeLockedNV defines the NV index, writes data into it and write-locks
// it (swtpm_setup --lock-nvram), all with platform authorisation, which is
// empty on a fresh TPM.
func writeLockedNV(tpm transport.TPM, index uint32, data []byte) error {
	pub := tpm2.TPMSNVPublic{
		NVIndex:    tpm2.TPMHandle(index),
		NameAlg:    tpm2.TPMAlgSHA256,
		Attributes: ekCertNVAttributes,
		DataSize:   uint16(len(data)),
	}
	if len(data) > 0xffff {
		return fmt.Errorf("%d bytes do not fit an NV index", len(data))
	}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHPlatform, PublicInfo: tpm2.New2B(pub)}).Execute(tpm); err != nil {
		return fmt.Errorf("TPM2_NV_DefineSpace 0x%08x: %w", index, err)
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
			return fmt.Errorf("TPM2_NV_Write 0x%08x: %w", index, err)
		}
		// The first write sets TPMA_NV_WRITTEN, which is part of the name.
		pub.Attributes.Written = true
		if name, err = tpm2.NVName(&pub); err != nil {
			return err
		}
		nv.Name = *name
	}
	if _, err := (tpm2.NVWriteLock{AuthHandle: tpm2.TPMRHPlatform, NVIndex: nv}).Execute(tpm); err != nil {
		return fmt.Errorf("TPM2_NV_WriteLock 0x%08x: %w", index, err)
	}
	return nil
}

var bankAlgs = map[string]tpm2.TPMAlgID{
	"sha1": tpm2.TPMAlgSHA1, "sha256": tpm2.TPMAlgSHA256, "sha384": tpm2.TPMAlgSHA384, "sha512": tpm2.TPMAlgSHA512,
}

// pcrBanks resolves bank names; none means {"sha256"}.
func pcrBanks(names []string) ([]tpm2.TPMAlgID, error) {
	if len(names) == 0 {
		names = []string{"sha256"}
	}
	var algs []tpm2.TPMAlgID
	for _, n := range names {
		alg, ok := bankAlgs[n]
		if !ok {
			return nil, fmt.Errorf("unknown PCR bank %q (want sha1, sha256, sha384 or sha512)", n)
		}
		if !slices.Contains(algs, alg) {
			algs = append(algs, alg)
		}
	}
	return algs, nil
}

// allocatePCRs makes exactly the given banks active, all 24 PCRs each, with
// TPM2_PCR_Allocate (TPM 2.0 Part 3, 22.5), which go-tpm v0.9 does not wrap:
// it is marshalled here. It takes effect at the TPM's next Startup.
func allocatePCRs(tpm transport.TPM, banks []tpm2.TPMAlgID) error {
	be := binary.BigEndian
	cmd := be.AppendUint16(nil, uint16(tpm2.TPMSTSessions))
	cmd = be.AppendUint32(cmd, 0) // size, set below
	cmd = be.AppendUint32(cmd, uint32(tpm2.TPMCCPCRAllocate))
	cmd = be.AppendUint32(cmd, uint32(tpm2.TPMRHPlatform))
	// One password session with the (empty) platform auth: handle,
	// nonce size 0, attributes 0, hmac size 0.
	cmd = be.AppendUint32(cmd, 9)
	cmd = be.AppendUint32(cmd, uint32(tpm2.TPMRSPW))
	cmd = append(cmd, 0, 0, 0, 0, 0)
	// TPML_PCR_SELECTION over every bank libtpms implements, so that
	// unlisted banks are deactivated.
	all := []tpm2.TPMAlgID{tpm2.TPMAlgSHA1, tpm2.TPMAlgSHA256, tpm2.TPMAlgSHA384, tpm2.TPMAlgSHA512}
	cmd = be.AppendUint32(cmd, uint32(len(all)))
	for _, a := range all {
		cmd = be.AppendUint16(cmd, uint16(a))
		cmd = append(cmd, 3) // sizeofSelect: 24 PCRs
		if slices.Contains(banks, a) {
			cmd = append(cmd, 0xff, 0xff, 0xff)
		} else {
			cmd = append(cmd, 0, 0, 0)
		}
	}
	be.PutUint32(cmd[2:], uint32(len(cmd)))
	rsp, err := tpm.Send(cmd)
	if err != nil {
		return fmt.Errorf("TPM2_PCR_Allocate: %w", err)
	}
	if err := rc20(rsp); err != nil {
		return fmt.Errorf("TPM2_PCR_Allocate: %w", err)
	}
	// Response: header, parameterSize, allocationSuccess (TPMI_YES_NO), ...
	if len(rsp) < 15 || rsp[14] != 1 {
		return errors.New("TPM2_PCR_Allocate: allocation refused")
	}
	return nil
}

func shutdown20(tpm transport.TPM, how tpm2.TPMSU) error {
	if _, err := (tpm2.Shutdown{ShutdownType: how}).Execute(tpm); err != nil {
		return fmt.Errorf("TPM2_Shutdown: %w", err)
	}
	return nil
}

// startup20 sends TPM2_Startup(CLEAR), tolerating a TPM already started.
func startup20(tpm transport.TPM) error {
	_, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm)
	if err != nil && !errors.Is(err, tpm2.TPMRCInitialize) {
		return fmt.Errorf("TPM2_Startup: %w", err)
	}
	return nil
}

// rc20 is the error of a raw TPM 2.0 response, if any.
func rc20(rsp []byte) error {
	if len(rsp) < 10 {
		return errors.New("short TPM response")
	}
	if rc := tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:10])); rc != tpm2.TPMRCSuccess {
		return rc
	}
	return nil
}
