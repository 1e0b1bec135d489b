package swtpm

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/spec"
)

// ErrNoEK: the TPM holds no endorsement key at the TCG handles
// (RSAEKHandle, ECCEKHandle, SwtpmSetupECCEKHandle), so it has no
// identity to take.
var ErrNoEK = errors.New("the TPM holds no endorsement key at the TCG handles")

// maxEKCertLen bounds an EK certificate read from NV.
const maxEKCertLen = 4096

// Identify reads the identity of a TPM 2.0 that another program
// manufactured (swtpm_setup, which libvirt runs at a Nova guest's first
// start) from its state in dir, keyed by secret, without touching that
// state: it copies the permanent state into a new directory under scratch
// (which must be private to vtpmd), runs swtpm there with the secret on a
// pipe (never argv, environment or a file), reads each EK at RSAEKHandle,
// ECCEKHandle and SwtpmSetupECCEKHandle with the certificate at
// RSAEKCertNV, ECCEKCertNV and SwtpmSetupECCEKCertNV, if any, then kills
// that swtpm (the copy has nothing to keep) and shreds the copy. The guest
// may run on the original meanwhile:
// swtpm writes its state whole (a new file renamed over the old).
//
// It fails with ErrNotManufactured when dir holds no TPM 2.0 state,
// ErrWrongSecret when the secret does not open it, and ErrNoEK when the TPM
// has no EK at those handles.
func Identify(ctx context.Context, dir, scratch string, secret []byte, binary string, log *slog.Logger) (_ *Identity, err error) {
	src := filepath.Join(dir, permallV20)
	if _, err := os.Stat(src); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("identifying the TPM in %s: %w", dir, ErrNotManufactured)
	} else if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(scratch, ".identify-")
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, shredDir(tmp)) }()
	if err := copyFile(src, filepath.Join(tmp, permallV20)); err != nil {
		return nil, fmt.Errorf("copying the TPM state: %w", err)
	}
	i := Instance{Dir: tmp, Version: spec.V20, Secret: secret, Binary: binary}
	p, err := Start(ctx, i, log)
	if err != nil {
		return nil, err
	}
	defer p.discard()
	tpm, err := Dial(ctx, i.DataSocket())
	if err != nil {
		return nil, err
	}
	defer tpm.Close()
	id := &Identity{}
	for _, k := range []struct {
		kind           EKKind
		handle, certNV uint32
	}{
		{RSA2048, RSAEKHandle, RSAEKCertNV},
		{ECCP256, ECCEKHandle, ECCEKCertNV},
		{ECCP256, SwtpmSetupECCEKHandle, SwtpmSetupECCEKCertNV},
	} {
		rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(k.handle)}.Execute(tpm)
		if err != nil {
			continue // no EK of this kind
		}
		pub, err := rp.OutPublic.Contents()
		if err != nil {
			return nil, err
		}
		key, err := tpm2.Pub(*pub)
		if err != nil {
			return nil, fmt.Errorf("the EK at 0x%x: %w", k.handle, err)
		}
		kind := k.kind
		if pub.Type == tpm2.TPMAlgECC {
			kind = ECCP256
			if d, err := pub.Parameters.ECCDetail(); err == nil && d.CurveID != tpm2.TPMECCNistP256 {
				kind = EKKind(fmt.Sprintf("ecc-curve-%#x", uint16(d.CurveID)))
			}
		}
		ek := EK{Kind: kind, Handle: k.handle, Public: key}
		if cert, err := readNV(tpm, k.certNV); err == nil {
			ek.CertDER, ek.NVIndex = cert, k.certNV
		}
		id.EKs = append(id.EKs, ek)
	}
	if len(id.EKs) == 0 {
		return nil, fmt.Errorf("identifying the TPM in %s: %w", dir, ErrNoEK)
	}
	return id, nil
}

// readNV reads NV index whole, with its own authorisation (an EK
// certificate's index is readable without one); an error if it is not
// defined.
func readNV(tpm transport.TPM, index uint32) ([]byte, error) {
	h := tpm2.TPMHandle(index)
	pub, err := tpm2.NVReadPublic{NVIndex: h}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	info, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, err
	}
	if info.DataSize > maxEKCertLen {
		return nil, fmt.Errorf("NV index 0x%x holds %d bytes", index, info.DataSize)
	}
	auth := tpm2.AuthHandle{Handle: h, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)}
	var out []byte
	const chunk = 1024 // at most TPM_PT_NV_BUFFER_MAX, 1024 in swtpm
	for off := uint16(0); off < info.DataSize; off += chunk {
		rsp, err := tpm2.NVRead{AuthHandle: auth, NVIndex: tpm2.NamedHandle{Handle: h, Name: pub.NVName},
			Size: min(chunk, info.DataSize-off), Offset: off}.Execute(tpm)
		if err != nil {
			return nil, err
		}
		out = append(out, rsp.Data.Buffer...)
	}
	if _, err := x509.ParseCertificate(out); err != nil {
		return nil, fmt.Errorf("NV index 0x%x holds no certificate: %w", index, err)
	}
	return out, nil
}

// copyFile copies src to dst (0600), for a scratch copy: not synced, as it
// is never used again after a crash.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// shredDir overwrites every regular file in dir with zeros, syncs it, and
// removes dir.
func shredDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if e.Type().IsRegular() {
			errs = append(errs, shredFile(filepath.Join(dir, e.Name())))
		}
	}
	return errors.Join(append(errs, os.RemoveAll(dir))...)
}

func shredFile(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if _, err := f.Write(make([]byte, fi.Size())); err != nil {
		return err
	}
	return f.Sync()
}
