package server

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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
		return tx.CreateVTPM(&store.VTPM{InstanceID: inst, Project: "p1", Spec: spec.Spec{Version: spec.V20, Model: spec.TIS},
			Host: "h1", Desired: store.DesiredRunning, Phase: store.PhaseActive, SecretID: inst, EKs: eks})
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
	g.agent = &attestor.Agent{TPM: g.tpm, API: client.New(f.srv.URL, ""), Subject: client.Instance(inst), EventLog: g.fwLog}
	return g
}

// dial connects the guest's TPM client (swtpm serves one at a time).
func (g *guest) dial(t *testing.T) {
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
func (g *guest) measure(t *testing.T, pcr int, digest []byte) {
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
