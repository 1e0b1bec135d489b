// Package attestor is the attesting side of vtpmd's attestation, run by
// vtpm-guest inside a guest for its vTPM and by the host agent for the
// host's own TPM: it makes an attestation key (AK) in the TPM, registers it
// with vtpmd proving by credential activation that it lives in the TPM of
// the registered EK, then quotes the PCRs against vtpmd's nonces and pushes
// the quote with the firmware's event log, and the IMA log: whole the first
// time, then only the entries after those vtpmd holds.
package attestor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attest"
)

// DefaultEventLog is where Linux exposes the firmware's event log.
const DefaultEventLog = "/sys/kernel/security/tpm0/binary_bios_measurements"

// DefaultIMALog is where Linux exposes IMA's measurement list.
const DefaultIMALog = "/sys/kernel/security/ima/binary_runtime_measurements"

// TCG handles: the EK's persistent handle, and the NV index of the RSA
// EK certificate.
const (
	ekHandle     = tpm2.TPMHandle(0x81010001)
	ekCertRSA    = tpm2.TPMHandle(0x01c00002)
	nvReadChunk  = 768 // below every TPM's TPM_PT_NV_BUFFER_MAX
	maxEKCertLen = 4096
)

// OpenTPM opens a TPM device (/dev/tpmrm0), or unix:PATH, a TPM
// simulator's data socket.
func OpenTPM(path string) (transport.TPMCloser, error) {
	if sock, ok := strings.CutPrefix(path, "unix:"); ok {
		conn, err := net.Dial("unix", sock)
		if err != nil {
			return nil, err
		}
		return transport.FromReadWriteCloser(conn), nil
	}
	return linuxtpm.Open(path)
}

// Agent attests one subject.
type Agent struct {
	TPM     transport.TPM
	API     *client.Client
	Subject client.Subject
	// EventLog is the firmware event log's path; default DefaultEventLog.
	EventLog string
	// IMALog is the kernel's binary IMA log (DefaultIMALog), sent when
	// present; "" sends none.
	IMALog string
	// PCRs are the SHA-256 PCRs quoted; default 0–10: the firmware's
	// (0–7), the Linux EFI stub's measurements of the initrd and command
	// line (9), and IMA's (10).
	PCRs []uint
	// EKCertificate sends the EK certificate from the TPM's NV: a host's
	// TPM, which vtpmd did not make, is known only by its certificate.
	EKCertificate bool

	ak        *tpm2.NamedHandle
	token     string           // the registered agent's bearer token
	transient []tpm2.TPMHandle // what Register loaded, for Flush
	// imaHeld is how many IMA entries vtpmd holds of this boot's log (its
	// last answer's ima_entries): the next evidence sends those after.
	imaHeld int
}

// Flush unloads the keys Register loaded. A resource manager
// (/dev/tpmrm0) does it when the TPM is closed; a bare TPM keeps them.
func (a *Agent) Flush() {
	for _, h := range a.transient {
		tpm2.FlushContext{FlushHandle: h}.Execute(a.TPM)
	}
	a.transient, a.ak = nil, nil
}

// Register creates the AK (a primary key of the owner hierarchy: the same
// template gives the same key after a reboot) and registers it.
func (a *Agent) Register(ctx context.Context) error {
	created, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(attest.RSAAKTemplate)}.Execute(a.TPM)
	if err != nil {
		return fmt.Errorf("creating the attestation key: %w", err)
	}
	a.ak = &tpm2.NamedHandle{Handle: created.ObjectHandle, Name: created.Name}
	a.transient = append(a.transient, created.ObjectHandle)
	ek, err := a.endorsementKey()
	if err != nil {
		return err
	}
	req := api.RegisterRequest{AKPublic: tpm2.Marshal(created.OutPublic)}
	if req.EKPublic, err = a.readEK(ek); err != nil {
		return err
	}
	if a.EKCertificate {
		if req.EKCertificate, err = a.readNV(ekCertRSA); err != nil {
			return fmt.Errorf("reading the EK certificate: %w", err)
		}
	}
	ch, err := a.API.Register(ctx, a.Subject, req)
	if err != nil {
		return fmt.Errorf("registering: %w", err)
	}
	if ch.EKHandle != "" {
		h, err := strconv.ParseUint(ch.EKHandle, 0, 32)
		if err != nil {
			return fmt.Errorf("EK handle %q: %w", ch.EKHandle, err)
		}
		ek = tpm2.TPMHandle(h)
	}
	secret, err := a.activate(ek, ch)
	if err != nil {
		return err
	}
	act, err := a.API.Activate(ctx, a.Subject, api.ActivateRequest{Ticket: ch.Ticket, Secret: secret})
	if err != nil {
		return fmt.Errorf("activating: %w", err)
	}
	a.API, a.token = a.API.WithAgentToken(act.AgentToken), act.AgentToken
	a.imaHeld = 0
	return nil
}

// Token is the bearer token Register got, which another process of the
// same guest hands to Resume; "" before.
func (a *Agent) Token() string { return a.token }

// Resume takes over the registration of another agent of this TPM (the
// guest agent's, whose token it got) without registering again: the AK is
// made from the same template in the same hierarchy, so it is the same
// key, and the token is the registered agent's.
func (a *Agent) Resume(token string) error {
	created, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(attest.RSAAKTemplate)}.Execute(a.TPM)
	if err != nil {
		return fmt.Errorf("loading the attestation key: %w", err)
	}
	a.ak = &tpm2.NamedHandle{Handle: created.ObjectHandle, Name: created.Name}
	a.transient = append(a.transient, created.ObjectHandle)
	a.API, a.token = a.API.WithAgentToken(token), token
	return nil
}

// AK is the registered attestation key, loaded in the TPM (Register or
// Resume); false before.
func (a *Agent) AK() (tpm2.NamedHandle, bool) {
	if a.ak == nil {
		return tpm2.NamedHandle{}, false
	}
	return *a.ak, true
}

// endorsementKey is the RSA EK: persistent at the TCG handle, as vtpmd
// makes it, or else made again from the TCG default template, as most
// TPMs that leave the factory need.
func (a *Agent) endorsementKey() (tpm2.TPMHandle, error) {
	if _, err := (tpm2.ReadPublic{ObjectHandle: ekHandle}).Execute(a.TPM); err == nil {
		return ekHandle, nil
	}
	created, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tpm2.RSAEKTemplate)}.Execute(a.TPM)
	if err != nil {
		return 0, fmt.Errorf("making the endorsement key: %w", err)
	}
	a.transient = append(a.transient, created.ObjectHandle)
	return created.ObjectHandle, nil
}

// readNV reads a whole NV index, in chunks the TPM accepts.
func (a *Agent) readNV(index tpm2.TPMHandle) ([]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: index}.Execute(a.TPM)
	if err != nil {
		return nil, err
	}
	info, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, err
	}
	if info.DataSize > maxEKCertLen {
		return nil, fmt.Errorf("NV index 0x%x holds %d bytes", uint32(index), info.DataSize)
	}
	auth := tpm2.AuthHandle{Handle: index, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)}
	var out []byte
	for off := uint16(0); off < info.DataSize; off += nvReadChunk {
		rsp, err := tpm2.NVRead{AuthHandle: auth, NVIndex: tpm2.NamedHandle{Handle: index, Name: pub.NVName},
			Size: min(nvReadChunk, info.DataSize-off), Offset: off}.Execute(a.TPM)
		if err != nil {
			return nil, err
		}
		out = append(out, rsp.Data.Buffer...)
	}
	return out, nil
}

func (a *Agent) readEK(h tpm2.TPMHandle) ([]byte, error) {
	rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(a.TPM)
	if err != nil {
		return nil, fmt.Errorf("reading the EK at 0x%x: %w", uint32(h), err)
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

// activate opens the credential with the EK, under the TCG EK policy
// (PolicySecret of the endorsement hierarchy).
func (a *Agent) activate(ek tpm2.TPMHandle, ch api.CredentialChallenge) ([]byte, error) {
	secret, err := ActivateCredential(a.TPM, *a.ak, ek, ch)
	if err != nil {
		return nil, fmt.Errorf("activating the credential: %w", err)
	}
	return secret, nil
}

// ActivateCredential opens a registration's credential challenge in tpm:
// TPM2_ActivateCredential with the AK (empty password) and the EK at ek
// under the TCG EK policy (PolicySecret of the endorsement hierarchy). It
// returns the secret the challenge carried.
func ActivateCredential(tpm transport.TPM, ak tpm2.NamedHandle, ek tpm2.TPMHandle, ch api.CredentialChallenge) ([]byte, error) {
	rp, err := tpm2.ReadPublic{ObjectHandle: ek}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	policy := tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tpm transport.TPM, handle tpm2.TPMISHPolicy, nonceTPM tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicySecret{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
			PolicySession: handle, NonceTPM: nonceTPM}.Execute(tpm)
		return err
	})
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: ak.Handle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle:      tpm2.AuthHandle{Handle: ek, Name: rp.Name, Auth: policy},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: ch.CredentialBlob},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: ch.EncryptedSeed},
	}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	return rsp.CertInfo.Buffer, nil
}

// Attest quotes the PCRs against a fresh nonce and pushes the evidence;
// it returns vtpmd's verdict. When vtpmd does not hold the IMA entries the
// evidence continues from, it sends the whole log with the same quote.
func (a *Agent) Attest(ctx context.Context) (api.Attestation, error) {
	if a.ak == nil {
		return api.Attestation{}, errors.New("not registered")
	}
	n, err := a.API.Nonce(ctx, a.Subject)
	if err != nil {
		return api.Attestation{}, fmt.Errorf("asking for a nonce: %w", err)
	}
	ev, err := a.Evidence(n.Nonce)
	if err != nil {
		return api.Attestation{}, err
	}
	out, err := a.API.Evidence(ctx, a.Subject, ev)
	if client.ErrorCode(err) == api.CodeFullIMALogRequired && ev.IMAOffset > 0 {
		a.imaHeld = 0
		if ev.IMALog, ev.IMAOffset, err = a.readIMA(); err != nil {
			return out, err
		}
		out, err = a.API.Evidence(ctx, a.Subject, ev)
	}
	if err == nil {
		a.imaHeld = out.IMAEntries
	}
	return out, err
}

// Wait returns when the next attestation is due: after interval, or as
// soon as vtpmd asks for fresh evidence (a long poll), with the names of
// the secrets it revoked from the instance meanwhile (the key broker).
// When vtpmd cannot be asked it just sleeps.
func (a *Agent) Wait(ctx context.Context, interval time.Duration) (revoked []string) {
	deadline := time.Now().Add(interval)
	for left := interval; left > 0; left = time.Until(deadline) {
		r, err := a.API.AwaitRefresh(ctx, a.Subject, left)
		if r.Requested {
			return r.Revoked
		}
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(time.Until(deadline)):
			}
			return nil
		}
	}
	return nil
}

// Evidence quotes the PCRs with nonce and gathers what goes with it: the
// PCR values, the firmware's event log, and the IMA log (read after the
// quote, so that it holds at least what the quote covers) from the first
// entry vtpmd does not hold yet. Attest keeps vtpmd's count from its
// answer; evidence pushed otherwise leaves the count as it was (vtpmd
// refuses a continuation from the wrong entry, and Attest recovers).
func (a *Agent) Evidence(nonce []byte) (api.EvidenceRequest, error) {
	pcrs := a.PCRs
	if pcrs == nil {
		pcrs = []uint{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, attest.IMAPCR}
	}
	ev := api.EvidenceRequest{Nonce: nonce}
	// IMA may extend PCR 10 between reading the PCRs and quoting them:
	// then the values do not match the quote, and the agent tries again.
	for try := 0; ; try++ {
		values, err := a.readPCRs(pcrs)
		if err != nil {
			return ev, err
		}
		quote := tpm2.Quote{SignHandle: *a.ak, QualifyingData: tpm2.TPM2BData{Buffer: nonce},
			InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull}, PCRSelect: pcrSelection(pcrs...)}
		q, err := quote.Execute(a.TPM)
		if err != nil {
			// The TPM restarted under the agent (its state moved with its
			// vTPM, say): the AK is made again, and is the one registered
			// as long as the TPM is the same.
			if rerr := a.remakeAK(); rerr != nil {
				return ev, fmt.Errorf("quoting: %w; %w", err, rerr)
			}
			quote.SignHandle = *a.ak
			if q, err = quote.Execute(a.TPM); err != nil {
				return ev, fmt.Errorf("quoting: %w", err)
			}
		}
		if quotes(q.Quoted, pcrs, values) || try == 2 {
			ev.Attest, ev.Signature, ev.PCRs = q.Quoted.Bytes(), tpm2.Marshal(q.Signature), values
			break
		}
	}
	path := a.EventLog
	if path == "" {
		path = DefaultEventLog
	}
	var err error
	if ev.EventLog, err = os.ReadFile(path); err != nil {
		return ev, fmt.Errorf("reading the event log: %w", err)
	}
	ev.IMALog, ev.IMAOffset, err = a.readIMA()
	return ev, err
}

// remakeAK makes the AK again from its template, after the TPM lost it
// (a TPM restarted keeps its owner hierarchy's seed, so the key is the
// same): an error if it is not the key registered, the TPM being another.
func (a *Agent) remakeAK() error {
	created, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(attest.RSAAKTemplate)}.Execute(a.TPM)
	if err != nil {
		return fmt.Errorf("making the attestation key again: %w", err)
	}
	if !bytes.Equal(created.Name.Buffer, a.ak.Name.Buffer) {
		tpm2.FlushContext{FlushHandle: created.ObjectHandle}.Execute(a.TPM)
		return errors.New("the TPM makes another attestation key than the one registered: it is another TPM; register again")
	}
	if created.ObjectHandle != a.ak.Handle {
		tpm2.FlushContext{FlushHandle: a.ak.Handle}.Execute(a.TPM) // if the TPM still holds it
	}
	a.transient = slices.DeleteFunc(a.transient, func(h tpm2.TPMHandle) bool { return h == a.ak.Handle })
	a.ak = &tpm2.NamedHandle{Handle: created.ObjectHandle, Name: created.Name}
	a.transient = append(a.transient, created.ObjectHandle)
	return nil
}

// readIMA reads the IMA log, if there is one, from the first entry vtpmd
// does not hold (the offset); whole if the log is shorter than what vtpmd
// holds, which then asks for it whole anyway.
func (a *Agent) readIMA() ([]byte, int, error) {
	if a.IMALog == "" {
		return nil, 0, nil
	}
	log, err := os.ReadFile(a.IMALog)
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("reading the IMA log: %w", err)
	}
	if a.imaHeld == 0 {
		return log, 0, nil
	}
	_, held, err := attest.ParseIMAPrefix(log, a.imaHeld)
	if err != nil {
		return log, 0, nil
	}
	return log[len(held):], a.imaHeld, nil
}

func pcrSelection(pcrs ...uint) tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(pcrs...)}}}
}

// readPCRs reads the SHA-256 values of pcrs. PCR_Read returns at most 8
// values per call; one PCR per call keeps it plain.
func (a *Agent) readPCRs(pcrs []uint) (map[int][]byte, error) {
	out := map[int][]byte{}
	for _, i := range pcrs {
		r, err := tpm2.PCRRead{PCRSelectionIn: pcrSelection(i)}.Execute(a.TPM)
		if err != nil || len(r.PCRValues.Digests) != 1 {
			return nil, fmt.Errorf("reading PCR %d: %v", i, err)
		}
		out[int(i)] = r.PCRValues.Digests[0].Buffer
	}
	return out, nil
}

// quotes reports whether quoted covers exactly values (in PCR order).
func quotes(quoted tpm2.TPM2BAttest, pcrs []uint, values map[int][]byte) bool {
	at, err := quoted.Contents()
	if err != nil {
		return false
	}
	info, err := at.Attested.Quote()
	if err != nil {
		return false
	}
	h := sha256.New()
	for _, i := range slices.Sorted(slices.Values(pcrs)) {
		h.Write(values[int(i)])
	}
	return bytes.Equal(h.Sum(nil), info.PCRDigest.Buffer)
}
