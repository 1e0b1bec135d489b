package server

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// guest is a VM as the verifier sees it: a vTPM manufactured the way
// vtpmd makes them, running, recorded in the fixture's store as instance
// inst's, and the guest agent's code on its data socket.
type guest struct {
	inst   swtpm.Instance
	id     *swtpm.Identity
	conn   net.Conn
	tpm    transport.TPM
	agent  *attestor.Agent
	fwLog  string // the firmware event log's path, as the agent reads it
	imaLog string // the IMA log's path
}

// newGuest makes a guest whose firmware measured fw (and wrote its log),
// with the agent not yet registered.
func newGuest(t *testing.T, f *fixture, fw []attesttest.Measurement) *guest {
	t.Helper()
	swtpmtest.Require(t)
	i, id := swtpmtest.Manufactured(t, spec.V20, nil)
	return newGuestOf(t, f, inst, "p1", i, id, fw)
}

// newGuestOf is newGuest for instance instanceID of project, on the
// manufactured vTPM i of identity id.
func newGuestOf(t testing.TB, f *fixture, instanceID, project string, i swtpm.Instance, id *swtpm.Identity, fw []attesttest.Measurement) *guest {
	t.Helper()
	swtpmtest.Start(t, i)
	var eks []store.EK
	for _, ek := range id.EKs {
		der, err := x509.MarshalPKIXPublicKey(ek.Public)
		if err != nil {
			t.Fatal(err)
		}
		eks = append(eks, store.EK{Kind: string(ek.Kind), Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: der, CertDER: ek.CertDER})
	}
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		return tx.CreateVTPM(&store.VTPM{InstanceID: instanceID, Project: project, Spec: spec.Spec{Version: spec.V20, Model: spec.TIS},
			Host: "h1", Desired: store.DesiredRunning, Phase: store.PhaseActive, SecretID: instanceID, EKs: eks})
	})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	g := &guest{inst: i, id: id, fwLog: filepath.Join(dir, "binary_bios_measurements"), imaLog: filepath.Join(dir, "binary_runtime_measurements")}
	g.dial(t)
	log, _ := attesttest.EventLog(fw)
	if err := os.WriteFile(g.fwLog, log, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, m := range fw {
		d := sha256.Sum256(m.Data)
		g.measure(t, m.PCR, d[:])
	}
	g.agent = &attestor.Agent{TPM: g.tpm, API: client.New(f.srv.URL, ""), Subject: client.Instance(instanceID), EventLog: g.fwLog}
	return g
}

// dial connects the guest's TPM client (swtpm serves one at a time).
func (g *guest) dial(t testing.TB) {
	t.Helper()
	conn, err := net.Dial("unix", g.inst.DataSocket())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(2 * time.Minute))
	g.conn, g.tpm = conn, swtpm.Retrying(transport.FromReadWriter(conn))
	if g.agent != nil {
		g.agent.TPM = g.tpm
	}
}

// measure extends digest into pcr, as firmware or the kernel does.
func (g *guest) measure(t testing.TB, pcr int, digest []byte) {
	t.Helper()
	_, err := tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: digest}}}}.Execute(g.tpm)
	if err != nil {
		t.Fatalf("extending PCR %d: %v", pcr, err)
	}
}

// tpm2Tools runs a tpm2-tools command against the guest's TPM in dir,
// with the agent's client disconnected meanwhile.
func (g *guest) tpm2Tools(t *testing.T, dir string, args ...string) {
	t.Helper()
	g.conn.Close()
	defer g.dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=swtpm:path="+g.inst.DataSocket())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
}

// foreignQuote is what an attacker with root in the guest sends instead of
// the agent: tpm2-tools makes the AK again (the same template in the same
// TPM gives the same key) and quotes the PCRs it chooses against nonce.
// It flushes every transient object after, the agent's AK too.
func (g *guest) foreignQuote(t *testing.T, nonce []byte, pcrs []int) (attestBytes, sig []byte, values map[int][]byte) {
	t.Helper()
	swtpmtest.Require(t, "tpm2_quote", "tpm2_createprimary", "tpm2_pcrread", "tpm2_flushcontext")
	dir := t.TempDir()
	list := "sha256:"
	for n, i := range pcrs {
		if n > 0 {
			list += ","
		}
		list += strconv.Itoa(i)
	}
	g.tpm2Tools(t, dir, "tpm2_createprimary", "-Q", "-C", "o", "-G", "rsa2048:rsassa-sha256:null",
		"-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign", "-c", "ak.ctx")
	g.tpm2Tools(t, dir, "tpm2_quote", "-Q", "-c", "ak.ctx", "-l", list, "-q", hex.EncodeToString(nonce), "-m", "attest", "-s", "sig")
	g.tpm2Tools(t, dir, "tpm2_pcrread", "-Q", list, "-o", "values")
	g.tpm2Tools(t, dir, "tpm2_flushcontext", "-t") // swtpm holds three objects; the agent's AK goes too
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	raw := read("values") // the digests, in PCR order
	if len(raw) != 32*len(pcrs) {
		t.Fatalf("tpm2_pcrread wrote %d bytes for %d PCRs", len(raw), len(pcrs))
	}
	values = map[int][]byte{}
	for n, i := range pcrs {
		values[i] = raw[32*n : 32*(n+1)]
	}
	return read("attest"), read("sig"), values
}

func digestHex(data string) string {
	d := sha256.Sum256([]byte(data))
	return hex.EncodeToString(d[:])
}

// applyPolicy creates the operator's policy name allowing digests and
// applies it to inst.
func applyPolicy(t *testing.T, f *fixture, name string, digests map[int][]string) {
	t.Helper()
	if code := f.call(t, "POST", "/v1/policies", "", api.CreatePolicyRequest{Name: name, Digests: digests}, nil); code != 201 {
		t.Fatalf("creating policy %s: %d", name, code)
	}
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/attestation/policy", "", api.PolicyRequest{Policy: name}, nil); code != 200 {
		t.Fatalf("applying policy %s: %d", name, code)
	}
}

// pushAsAgent sends ev with the registered agent's token.
func pushAsAgent(t *testing.T, g *guest, ev api.EvidenceRequest) (api.Attestation, error) {
	t.Helper()
	return g.agent.API.Evidence(context.Background(), client.Instance(inst), ev)
}

// A digest policy judges the events of the PCRs it names, and only a
// quote vouches for events. The attack: a guest booted a kernel the
// policy does not allow; root in it quotes with tpm2-tools every PCR but
// 4 and sends the event log as it stood before the kernel's event. That
// was judged trusted; it must be untrusted, naming PCR 4.
func TestDigestPolicyNeedsItsPCRsQuoted(t *testing.T) {
	f := newFixture(t)
	firmware := attesttest.Measurement{PCR: 0, Type: 0x8, Data: []byte("firmware")}
	loader := attesttest.Measurement{PCR: 4, Type: 0x80000003, Data: []byte("boot loader")}
	evil := attesttest.Measurement{PCR: 4, Type: 0x80000003, Data: []byte("kernel E")}
	g := newGuest(t, f, []attesttest.Measurement{firmware, loader, evil})
	ctx := context.Background()
	if err := g.agent.Register(ctx); err != nil {
		t.Fatal(err)
	}
	applyPolicy(t, f, "kernels", map[int][]string{4: {digestHex("boot loader"), digestHex("kernel A"), digestHex("kernel B")}})

	// The agent's evidence quotes PCR 4: the kernel is caught.
	a, err := g.agent.Attest(ctx)
	if err != nil || a.Verdict != "untrusted" || len(a.Reasons) != 1 || !strings.Contains(a.Reasons[0], "PCR 4: event #3") {
		t.Fatalf("the agent's evidence: %+v %v", a, err)
	}

	// The attacker's leaves PCR 4 out.
	n, err := g.agent.API.Nonce(ctx, client.Instance(inst))
	if err != nil {
		t.Fatal(err)
	}
	at, sig, values := g.foreignQuote(t, n.Nonce, []int{0, 1, 2, 3, 5, 6, 7})
	truncated, _ := attesttest.EventLog([]attesttest.Measurement{firmware, loader})
	a, err = pushAsAgent(t, g, api.EvidenceRequest{Nonce: n.Nonce, Attest: at, Signature: sig, PCRs: values, EventLog: truncated})
	if err != nil || a.Verdict != "untrusted" || len(a.Reasons) != 1 || a.Reasons[0] != "PCR 4: the quote leaves it out, so nothing vouches for its events" {
		t.Fatalf("a quote without PCR 4: %+v %v", a, err)
	}
}

// The same attack on an IMA allowlist: after a file it does not allow was
// measured, root quotes every PCR but 10 and, since an IMA log needs PCR
// 10 quoted, puts the allowed files' measurements in the firmware's event
// log as PCR 10 events instead. Untrusted, naming PCR 10; and the IMA
// log truncated before the file, without PCR 10, is refused as before.
func TestIMAAllowlistNeedsPCR10Quoted(t *testing.T) {
	f := newFixture(t)
	firmware := attesttest.Measurement{PCR: 0, Type: 0x8, Data: []byte("firmware")}
	g := newGuest(t, f, []attesttest.Measurement{firmware})
	files := []attesttest.IMAFile{{Path: "boot_aggregate", Content: []byte("agg")}, {Path: "/usr/sbin/sshd", Content: []byte("sshd")},
		{Path: "/tmp/rootkit", Content: []byte("rootkit")}}
	imaLog, extends := attesttest.IMALog(files)
	for _, e := range extends {
		g.measure(t, attest.IMAPCR, e)
	}
	if err := os.WriteFile(g.imaLog, imaLog, 0o600); err != nil {
		t.Fatal(err)
	}
	g.agent.IMALog = g.imaLog
	ctx := context.Background()
	if err := g.agent.Register(ctx); err != nil {
		t.Fatal(err)
	}
	applyPolicy(t, f, "files", map[int][]string{attest.IMAPCR: {digestHex("agg"), digestHex("sshd")}})
	a, err := g.agent.Attest(ctx)
	if err != nil || a.Verdict != "untrusted" || len(a.Reasons) != 1 || !strings.HasPrefix(a.Reasons[0], "PCR 10: /tmp/rootkit") {
		t.Fatalf("the agent's evidence: %+v %v", a, err)
	}

	forged, _ := attesttest.EventLog([]attesttest.Measurement{firmware, {PCR: 10, Type: 0xd, Data: []byte("agg")}, {PCR: 10, Type: 0xd, Data: []byte("sshd")}})
	before, _ := attesttest.EventLog([]attesttest.Measurement{firmware})
	truncatedIMA, _ := attesttest.IMALog(files[:2])
	for _, c := range []struct {
		name     string
		log, ima []byte
		reason   string
	}{
		{"PCR 10 events in the firmware log", forged, nil, "PCR 10: the quote leaves it out, so nothing vouches for its events"},
		{"the IMA log before the file", before, truncatedIMA, "an IMA log came without a quote of PCR 10"},
	} {
		n, err := g.agent.API.Nonce(ctx, client.Instance(inst))
		if err != nil {
			t.Fatal(err)
		}
		at, sig, values := g.foreignQuote(t, n.Nonce, []int{0, 1, 2, 3, 4, 5, 6, 7})
		a, err = pushAsAgent(t, g, api.EvidenceRequest{Nonce: n.Nonce, Attest: at, Signature: sig, PCRs: values, EventLog: c.log, IMALog: c.ima})
		if err != nil || a.Verdict != "untrusted" || len(a.Reasons) != 1 || a.Reasons[0] != c.reason {
			t.Errorf("%s: %+v %v", c.name, a, err)
		}
	}
}

// Evidence without a firmware event log is refused, not judged: 400
// no_event_log, with nothing recorded and the nonce unspent, so that the
// agent can send it again with the log.
func TestEvidenceWithoutEventLog(t *testing.T) {
	f := newFixture(t)
	g := newGuest(t, f, []attesttest.Measurement{{PCR: 0, Type: 0x8, Data: []byte("firmware")}})
	ctx := context.Background()
	if err := g.agent.Register(ctx); err != nil {
		t.Fatal(err)
	}
	status := func() (api.Attestation, []string) {
		var a api.Attestation
		f.call(t, "GET", "/v1/vtpms/"+inst+"/attestation", "", nil, &a)
		var h api.EventList
		f.call(t, "GET", "/v1/vtpms/"+inst+"/attestation/history", "", nil, &h)
		var actions []string
		for _, e := range h.Items {
			actions = append(actions, e.Action)
		}
		return a, actions
	}
	before, history := status()
	n, err := g.agent.API.Nonce(ctx, client.Instance(inst))
	if err != nil {
		t.Fatal(err)
	}
	ev, err := g.agent.Evidence(n.Nonce)
	if err != nil {
		t.Fatal(err)
	}
	for _, empty := range [][]byte{nil, {}} {
		bare := ev
		bare.EventLog = empty
		var e *client.Error
		if a, err := pushAsAgent(t, g, bare); !errors.As(err, &e) || e.Status != 400 || e.Code != api.CodeNoEventLog {
			t.Fatalf("evidence with event log %q: %+v %v", empty, a, err)
		}
	}
	after, historyAfter := status()
	if after.Verdict != before.Verdict || !slices.Equal(after.Reasons, before.Reasons) || !after.VerifiedAt.Equal(before.VerifiedAt) || !slices.Equal(history, historyAfter) {
		t.Fatalf("refused evidence changed the record: %+v %v, was %+v %v", after, historyAfter, before, history)
	}
	if a, err := pushAsAgent(t, g, ev); err != nil || a.Verdict != "pending" || a.Reasons[0] != "no policy yet" {
		t.Fatalf("the same evidence with its log: %+v %v", a, err)
	}
}

// An agent that registers with its TPM's ECC EK without naming the kind
// gets a challenge for that EK (the kind is the key's); a key that is no
// EK vtpmd makes, or a kind the key contradicts, is a 400 that says so.
func TestRegisterInfersTheEKKind(t *testing.T) {
	f := newFixture(t)
	g := newGuest(t, f, nil)
	created, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(attest.RSAAKTemplate)}.Execute(g.tpm)
	if err != nil {
		t.Fatal(err)
	}
	ak := tpm2.NamedHandle{Handle: created.ObjectHandle, Name: created.Name}
	var ecc *swtpm.EK
	for i := range g.id.EKs {
		if g.id.EKs[i].Kind == swtpm.ECCP256 {
			ecc = &g.id.EKs[i]
		}
	}
	eccDER, _ := x509.MarshalPKIXPublicKey(ecc.Public)
	base := "/v1/vtpms/" + inst + "/attestation"
	akPublic := tpm2.Marshal(created.OutPublic)
	var ch api.CredentialChallenge
	if code := f.call(t, "POST", base+"/register", "", api.RegisterRequest{EKPublic: eccDER, AKPublic: akPublic}, &ch); code != 200 || ch.EKHandle != "0x81010002" {
		t.Fatalf("registering with the ECC EK: %d %+v", code, ch)
	}
	secret, err := attestor.ActivateCredential(g.tpm, ak, tpm2.TPMHandle(ecc.Handle), ch)
	if err != nil {
		t.Fatal(err)
	}
	var act api.Activation
	if code := f.call(t, "POST", base+"/activate", "", api.ActivateRequest{Ticket: ch.Ticket, Secret: secret}, &act); code != 200 || act.State != "registered" {
		t.Fatalf("activating with the ECC EK: %d %+v", code, act)
	}

	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p384DER, _ := x509.MarshalPKIXPublicKey(&p384.PublicKey)
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p256DER, _ := x509.MarshalPKIXPublicKey(&p256.PublicKey)
	for _, c := range []struct {
		name   string
		req    api.RegisterRequest
		status int
		code   api.Code
		says   string
	}{
		{"a P-384 key", api.RegisterRequest{EKPublic: p384DER, AKPublic: akPublic}, 400, api.CodeInvalidParameter, "ECC EK must be on NIST P-256"},
		{"no key", api.RegisterRequest{EKPublic: []byte("junk"), AKPublic: akPublic}, 400, api.CodeInvalidParameter, "ek_public is not a PKIX public key"},
		{"a contradicting kind", api.RegisterRequest{EKKind: "rsa2048", EKPublic: eccDER, AKPublic: akPublic}, 400, api.CodeInvalidParameter, "ek_kind is rsa2048, but ek_public is an ecc-nist-p256 key"},
		{"an unknown kind", api.RegisterRequest{EKKind: "ecc-nist-p384", AKPublic: akPublic}, 400, api.CodeInvalidParameter, "rsa2048 or ecc-nist-p256"},
		{"another ECC EK", api.RegisterRequest{EKPublic: p256DER, AKPublic: akPublic}, 403, api.CodeEKMismatch, "This ecc-nist-p256 EK is not the one"},
	} {
		var e api.ErrorBody
		if code := f.call(t, "POST", base+"/register", "", c.req, &e); code != c.status || e.Error.Code != c.code || !strings.Contains(e.Error.Message, c.says) {
			t.Errorf("%s: %d %+v", c.name, code, e)
		}
	}
}

// imaFiles are n files as IMA measures them, named after prefix.
func imaFiles(prefix string, n int) []attesttest.IMAFile {
	var out []attesttest.IMAFile
	for i := range n {
		p := fmt.Sprintf("/usr/lib/x86_64-linux-gnu/%s-%04d.so.1", prefix, i)
		out = append(out, attesttest.IMAFile{Path: p, Content: []byte(p)})
	}
	return out
}

// An IMA log of several hundred entries, far over what other requests may
// carry, attests; after that the agent sends only the entries measured
// since those the verifier holds, and the verifier judges the whole log
// (a file it does not allow stays in it). A continuation that does not
// replay is untrusted; one from an entry the verifier does not hold is
// refused asking for the whole log, which then attests with the same
// nonce; an agent facing a verifier that lost the log sends it whole.
func TestLargeAndIncrementalIMALog(t *testing.T) {
	f := newFixture(t)
	g := newGuest(t, f, []attesttest.Measurement{{PCR: 0, Type: 0x8, Data: []byte("firmware")}})
	g.agent.IMALog = g.imaLog
	ctx := context.Background()
	if err := g.agent.Register(ctx); err != nil {
		t.Fatal(err)
	}
	var files []attesttest.IMAFile
	measured := 0
	measure := func(more ...attesttest.IMAFile) {
		files = append(files, more...)
		log, extends := attesttest.IMALog(files)
		for _, e := range extends[measured:] {
			g.measure(t, attest.IMAPCR, e)
		}
		measured = len(files)
		if err := os.WriteFile(g.imaLog, log, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	allowed := imaFiles("libgood", 700)
	var digests []string
	for _, f := range allowed {
		digests = append(digests, digestHex(string(f.Content)))
	}
	applyPolicy(t, f, "files", map[int][]string{attest.IMAPCR: digests})
	attestOK := func(what string, entries int) api.Attestation {
		t.Helper()
		a, err := g.agent.Attest(ctx)
		if err != nil || a.Verdict != "trusted" || a.IMAEntries != entries {
			t.Fatalf("%s: %+v %v", what, a, err)
		}
		return a
	}

	measure(allowed[:600]...)
	if st, _ := os.Stat(g.imaLog); st.Size() <= maxBody {
		t.Fatalf("the IMA log is %d bytes, not over the %d bytes of other requests", st.Size(), maxBody)
	}
	attestOK("600 entries", 600)

	measure(allowed[600:620]...)
	n, err := g.agent.API.Nonce(ctx, client.Instance(inst))
	if err != nil {
		t.Fatal(err)
	}
	ev, err := g.agent.Evidence(n.Nonce)
	if tail, _ := attesttest.IMALog(files[600:]); err != nil || ev.IMAOffset != 600 || !bytes.Equal(ev.IMALog, tail) {
		t.Fatalf("the agent's continuation: offset %d, %d bytes, %v", ev.IMAOffset, len(ev.IMALog), err)
	}
	if a, err := pushAsAgent(t, g, ev); err != nil || a.Verdict != "trusted" || a.IMAEntries != 620 {
		t.Fatalf("a continuation of 20 entries: %+v %v", a, err)
	}
	var e *client.Error
	if _, err := pushAsAgent(t, g, ev); !errors.As(err, &e) || e.Code != api.CodeStaleNonce {
		t.Fatalf("the continuation replayed: %v", err)
	}

	// Continuations the verifier cannot take. (The agent still counts
	// 600 entries held: it did not push the last evidence itself.)
	measure(allowed[620])
	n, _ = g.agent.API.Nonce(ctx, client.Instance(inst))
	ev, _ = g.agent.Evidence(n.Nonce)
	forged := ev
	forged.IMAOffset = 620
	forged.IMALog, _ = attesttest.IMALog(allowed[621:622])
	if a, err := pushAsAgent(t, g, forged); err != nil || a.Verdict != "untrusted" || a.IMAEntries != 620 ||
		a.Reasons[0] != "the IMA log (1 entries from entry 620) does not replay to the quoted PCR 10" {
		t.Fatalf("a continuation that does not replay: %+v %v", a, err)
	}
	n, _ = g.agent.API.Nonce(ctx, client.Instance(inst))
	ev, _ = g.agent.Evidence(n.Nonce)
	for _, offset := range []int{600, 5, 700, -1} {
		elsewhere := ev
		elsewhere.IMAOffset = offset
		status, code := 409, api.CodeFullIMALogRequired
		if offset < 0 {
			status, code = 400, api.CodeInvalidParameter
		}
		if a, err := pushAsAgent(t, g, elsewhere); !errors.As(err, &e) || e.Status != status || e.Code != code {
			t.Fatalf("a continuation from entry %d: %+v %v", offset, a, err)
		}
	}
	whole := ev
	whole.IMAOffset, whole.IMALog = 0, nil
	whole.IMALog, _ = os.ReadFile(g.imaLog)
	if a, err := pushAsAgent(t, g, whole); err != nil || a.Verdict != "trusted" || a.IMAEntries != 621 {
		t.Fatalf("the whole log with the same nonce: %+v %v", a, err)
	}

	// The agent, its count behind, and then facing a verifier that lost
	// the log (say, restored from a backup), sends it whole when asked.
	attestOK("the agent after its count fell behind", 621)
	err = f.store.Update(ctx, func(tx *store.Tx) error {
		a, err := tx.GetAttestation(inst)
		if err != nil {
			return err
		}
		a.IMALog, a.IMAEntries = nil, 0
		return tx.PutAttestation(a)
	})
	if err != nil {
		t.Fatal(err)
	}
	attestOK("after the verifier lost the log", 621)

	// A file the policy does not allow is judged in its continuation, and
	// stays in the log the verifier judges.
	measure(attesttest.IMAFile{Path: "/tmp/rootkit", Content: []byte("rootkit")})
	for _, more := range [][]attesttest.IMAFile{nil, allowed[621:630]} {
		measure(more...)
		a, err := g.agent.Attest(ctx)
		if err != nil || a.Verdict != "untrusted" || a.IMAEntries != len(files) || !strings.HasPrefix(a.Reasons[0], "PCR 10: /tmp/rootkit") {
			t.Fatalf("with a file the policy does not allow, %d entries: %+v %v", len(files), a, err)
		}
	}
}

// Request bodies are bounded per route: a few tens of KiB for ordinary
// requests, MiBs for policies (allowlists) and for evidence, which only
// the registered agent may send.
func TestBodyLimits(t *testing.T) {
	f := newFixture(t)
	var e api.ErrorBody
	big := `{"instance_id": "` + strings.Repeat("x", maxBody) + `"}`
	if code := f.call(t, "POST", "/v1/vtpms", "", big, &e); code != 413 || e.Error.Code != api.CodeBodyTooLarge {
		t.Fatalf("a large create request: %d %+v", code, e)
	}
	var allowlist []string // a system's files: 140 KiB
	for i := range 2000 {
		allowlist = append(allowlist, digestHex(strconv.Itoa(i)))
	}
	if code := f.call(t, "POST", "/v1/policies", "", api.CreatePolicyRequest{Name: "system", Digests: map[int][]string{10: allowlist}}, &e); code != 201 {
		t.Fatalf("a policy of 2000 allowed digests: %d %+v", code, e)
	}
	g := newGuest(t, f, []attesttest.Measurement{{PCR: 0, Type: 0x8, Data: []byte("firmware")}})
	if err := g.agent.Register(context.Background()); err != nil {
		t.Fatal(err)
	}
	huge := `{"event_log": "` + strings.Repeat("A", maxEvidenceBody) + `"}`
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/attestation/evidence", "", huge, &e); code != 401 || e.Error.Code != api.CodeUnauthenticated {
		t.Fatalf("huge evidence from a stranger: %d %+v", code, e)
	}
	var tooLarge *client.Error
	a, err := pushAsAgent(t, g, api.EvidenceRequest{EventLog: make([]byte, maxEvidenceBody*3/4+1)}) // base64 makes it larger
	if !errors.As(err, &tooLarge) || tooLarge.Status != 413 || tooLarge.Code != api.CodeBodyTooLarge {
		t.Fatalf("huge evidence from the agent: %+v %v", a, err)
	}
}
