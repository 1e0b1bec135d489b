package swtpm

import (
	"context"
	"crypto"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
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

// TPM 2.0 EK handles and certificate NV indices, where the TCG puts them
// and where other TPM software (tpm2_getekcertificate, go-attestation)
// looks: RSA-2048 EK (EK Credential Profile 2.0, template L-1) at
// 0x81010001 with its certificate at 0x01c00002; ECC NIST P-256 EK
// (template L-2) at 0x81010002 with its certificate at 0x01c0000a.
const (
	RSAEKHandle = 0x81010001
	ECCEKHandle = 0x81010002
	RSAEKCertNV = 0x01c00002
	ECCEKCertNV = 0x01c0000a
)

// Where swtpm_setup, and vtpmd before it followed the TCG registry, put
// the ECC P-256 EK and its certificate: 0x01c00016 is the registry's index
// of the P-384 EK certificate (template H-3), so other tools do not find a
// P-256 certificate there. Identify still reads these, for vTPMs made that
// way (Nova's, older vtpmd's, and state bundles exported from them).
const (
	SwtpmSetupECCEKHandle = 0x81010016
	SwtpmSetupECCEKCertNV = 0x01c00016
)

// EKCertNV12 is the TPM 1.2 EK certificate's NV index (TPM_NV_INDEX_EKCert
// with the D bit; TCG PC Client Implementation Specification for
// Conventional BIOS 1.21, 7.4.4).
const EKCertNV12 = 0x1000f000

// EK is an endorsement key of a manufactured TPM.
type EK struct {
	Kind    EKKind
	Handle  uint32 // persistent handle; 0 for TPM 1.2, whose EK has none
	NVIndex uint32 // where the certificate is in the TPM's NV; 0 if not
	Public  crypto.PublicKey
	CertDER []byte // nil when not certified
}

// Identity is a manufactured TPM's public identity.
type Identity struct{ EKs []EK }

// ManufactureOptions configure Manufacture.
type ManufactureOptions struct {
	// Certify issues the certificate (DER) of an EK. It may run while the
	// TPM creates the next EK. nil, or a nil certificate, leaves the EK
	// uncertified; an error fails the manufacture.
	Certify func(ctx context.Context, kind EKKind, pub crypto.PublicKey) (der []byte, err error)
	// PCRBanks are the PCR banks a TPM 2.0 has active: any of "sha1",
	// "sha256", "sha384", "sha512". Default {"sha256"}, as swtpm_setup.
	PCRBanks []string
	// Log receives progress at debug level; nil is silent.
	Log *slog.Logger
}

// Manufacture creates a brand-new TPM in i.Dir, which must not hold TPM
// state yet (ErrManufactured), all in one swtpm process, and returns its
// identity once swtpm has shut down and the state (encrypted with i.Secret)
// is on disk.
//
// TPM 2.0: the RSA-2048 and ECC NIST P-256 EKs are created inside the TPM
// from the TCG default templates (EK Credential Profile L-1, L-2) and made
// persistent at RSAEKHandle and ECCEKHandle; opts.Certify certifies each and
// the DER goes into RSAEKCertNV and ECCEKCertNV, defined with platform
// authorisation and the attributes swtpm_setup uses (platform-create,
// written by platform only, readable by owner, platform and without
// authorisation, no DA), then write-locked as swtpm_setup --lock-nvram does;
// the PCR banks of opts are allocated (TPM2_PCR_Allocate, effective from
// the next start); TPM2_Shutdown(CLEAR) ends it cleanly.
//
// TPM 1.2: the TPM is enabled and activated through physical presence, the
// EK created (TPM_CreateEndorsementKeyPair, RSA-2048), its certificate
// written into EKCertNV12 with the TCG stored-certificate header, and the
// NV locked (TPM_NV_DefineSpace(TPM_NV_INDEX_LOCK)), as swtpm_setup does.
//
// When it fails, the files swtpm made are removed, so it can be run again.
func Manufacture(ctx context.Context, i Instance, opts ManufactureOptions) (*Identity, error) {
	id, _, err := manufacture(ctx, i, opts, false)
	return id, err
}

// ManufactureAndStart is Manufacture that leaves the TPM running, as Start
// would, instead of stopping swtpm: one process start fewer for a vTPM that
// is to serve at once. Before it returns, the TPM is reset through the
// control channel (so the PCR allocation and a 1.2 TPM's activation take
// effect, and the state is proven to reload) and started again.
func ManufactureAndStart(ctx context.Context, i Instance, opts ManufactureOptions) (*Identity, *Process, error) {
	return manufacture(ctx, i, opts, true)
}

func manufacture(ctx context.Context, i Instance, opts ManufactureOptions, keep bool) (_ *Identity, _ *Process, err error) {
	i, err = i.check()
	if err != nil {
		return nil, nil, fmt.Errorf("manufacturing: %w", err)
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	banks, err := pcrBanks(opts.PCRBanks)
	if err != nil {
		return nil, nil, fmt.Errorf("manufacturing: %w", err)
	}
	if exists, err := hasState(i.Dir); err != nil {
		return nil, nil, fmt.Errorf("manufacturing in %s: %w", i.Dir, err)
	} else if exists {
		return nil, nil, fmt.Errorf("manufacturing in %s: %w", i.Dir, ErrManufactured)
	}
	sw := newStopwatch()
	p, err := launch(ctx, i, log)
	if err != nil {
		return nil, nil, fmt.Errorf("manufacturing in %s: %w", i.Dir, err)
	}
	defer func() {
		if err != nil {
			p.kill(syscall.SIGKILL)
			<-p.done
			removeState(i.Dir)
			err = fmt.Errorf("manufacturing in %s: %w", i.Dir, err)
		}
	}()
	sw.lap("launch")

	tpm, err := Dial(ctx, i.DataSocket())
	if err != nil {
		return nil, nil, err
	}
	defer tpm.Close()
	var id *Identity
	if i.Version == spec.V12 {
		id, err = manufacture12(ctx, tpm, opts.Certify, sw)
	} else {
		id, err = manufacture20(ctx, tpm, opts.Certify, banks, sw)
	}
	if err != nil {
		return nil, nil, err
	}
	if keep {
		err = restart(ctx, tpm, i)
	} else {
		err = finish(ctx, tpm, p)
	}
	if err != nil {
		return nil, nil, err
	}
	// swtpm fsyncs its files but not the directory holding their names.
	if err := atomicfile.SyncDir(i.Dir); err != nil {
		return nil, nil, err
	}
	sw.lap("finish")
	log.Debug("manufactured TPM", append([]any{"dir", i.Dir, "version", i.Version, "took", sw.total()}, sw.laps...)...)
	if !keep {
		p = nil
	}
	return id, p, nil
}

// finish shuts the TPM down as swtpm_setup does (orderly TPM shutdown, then
// CMD_SHUTDOWN) and waits for a clean exit.
func finish(ctx context.Context, tpm transport.TPMCloser, p *Process) error {
	if p.inst.Version == spec.V20 {
		if err := shutdown20(tpm, tpm2.TPMSUClear); err != nil {
			return err
		}
	}
	tpm.Close() // swtpm serves the next client (none) and exits cleanly
	if err := shutdown(ctx, p.inst); err != nil {
		return fmt.Errorf("shutting swtpm down: %w", err)
	}
	select {
	case <-p.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if p.err != nil {
		return fmt.Errorf("swtpm exited: %w: %s", p.err, lastLines(p.out.String(), 4))
	}
	return nil
}

// restart resets the TPM (orderly shutdown, CMD_INIT) and starts it again,
// leaving it as a fresh Start would.
func restart(ctx context.Context, tpm transport.TPM, i Instance) error {
	if i.Version == spec.V20 {
		if err := shutdown20(tpm, tpm2.TPMSUClear); err != nil {
			return err
		}
	} else if _, err := send12(tpm, cmd12(ordSaveState, nil)); err != nil {
		return fmt.Errorf("TPM_SaveState: %w", err)
	}
	c, err := ctrl.Dial(ctx, i.CtrlSocket())
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Init(ctx, 0); err != nil {
		return fmt.Errorf("resetting the TPM: %w", err)
	}
	if i.Version == spec.V12 {
		return startup12(tpm)
	}
	return startup20(tpm)
}

// stopwatch records how long each step of a manufacture takes, for the
// debug log and the benchmarks that read it.
type stopwatch struct {
	start, last time.Time
	laps        []any // step name, duration, ...
}

func newStopwatch() *stopwatch {
	now := time.Now()
	return &stopwatch{start: now, last: now}
}

// lap ends step.
func (s *stopwatch) lap(step string) {
	now := time.Now()
	s.laps = append(s.laps, step, now.Sub(s.last))
	s.last = now
}

func (s *stopwatch) total() time.Duration { return s.last.Sub(s.start) }

// certifyAsync runs certify in the background and returns a function that
// waits for its result and checks that the certificate is for pub.
func certifyAsync(ctx context.Context, certify func(context.Context, EKKind, crypto.PublicKey) ([]byte, error),
	kind EKKind, pub crypto.PublicKey) func() ([]byte, error) {
	if certify == nil {
		return func() ([]byte, error) { return nil, nil }
	}
	type result struct {
		der []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		der, err := certify(ctx, kind, pub)
		ch <- result{der, err}
	}()
	return func() ([]byte, error) {
		r := <-ch
		if r.err != nil {
			return nil, fmt.Errorf("certifying the %s EK: %w", kind, r.err)
		}
		if r.der == nil {
			return nil, nil
		}
		cert, err := x509.ParseCertificate(r.der)
		if err != nil {
			return nil, fmt.Errorf("certificate of the %s EK: %w", kind, err)
		}
		if k, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(pub) {
			return nil, fmt.Errorf("certificate of the %s EK is for another key", kind)
		}
		return r.der, nil
	}
}

// removeState deletes what swtpm wrote into a directory that held no TPM
// state before a failed manufacture.
func removeState(dir string) {
	for _, f := range []string{permallV20, "tpm2-00.volatilestate", "tpm2-00.savestate",
		permallV12, "tpm-00.volatilestate", "tpm-00.savestate", ".lock"} {
		os.Remove(filepath.Join(dir, f))
	}
}
