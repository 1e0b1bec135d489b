package daemon

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// testHost is a swtpm playing a host's TPM, with an EK certificate from a
// test "vendor" CA, booted into a kernel of the test's choosing.
type testHost struct {
	vendor *swtpmtest.CA
	tpm    swtpm.Instance
	proc   *swtpm.Process
	caFile string // the vendor CA, as --host-ek-ca takes it
	log    string // the host boot's event log
}

func newTestHost(t *testing.T, dir, kernel string) *testHost {
	t.Helper()
	h := &testHost{vendor: swtpmtest.NewCA(t), caFile: filepath.Join(dir, "host-ek-ca.pem"), log: filepath.Join(dir, "host-event-log")}
	os.WriteFile(h.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: h.vendor.Cert.Raw}), 0o644)
	h.tpm, _ = swtpmtest.Manufactured(t, spec.V20, h.vendor)
	h.proc = bootHost(t, h.tpm, kernel, h.log)
	return h
}

// attests makes cfg's host agent attest h (hourly, so tests say when).
func (h *testHost) attests(cfg Config) Config {
	cfg.HostTPM, cfg.HostEventLog, cfg.HostEKCA, cfg.HostAttestInterval = "unix:"+h.tpm.DataSocket(), h.log, h.caFile, time.Hour
	return cfg
}

// reboot restarts the host's TPM and measures a boot of kernel into it.
func (h *testHost) reboot(t *testing.T, kernel string) {
	t.Helper()
	if err := h.proc.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.proc = bootHost(t, h.tpm, kernel, h.log)
}

// bootHost starts the swtpm that plays the host's TPM and measures into it
// a host boot of the given kernel, writing the boot's event log to logPath,
// as a host's firmware and boot loader would.
func bootHost(t *testing.T, i swtpm.Instance, kernel, logPath string) *swtpm.Process {
	t.Helper()
	p := swtpmtest.Start(t, i)
	log, _ := attesttest.EventLog([]attesttest.Measurement{
		{PCR: 0, Type: 0x80000008, Data: []byte("host firmware 1.0")},
		{PCR: 4, Type: 0x80000003, Data: []byte(kernel)},
		{PCR: 9, Type: 0x0d, Data: []byte("host initrd")},
	})
	conn, err := net.Dial("unix", i.DataSocket())
	if err != nil {
		t.Fatal(err)
	}
	boot(t, swtpm.Retrying(transport.FromReadWriter(conn)), log)
	conn.Close() // swtpm serves one connection: the host agent's next
	if err := os.WriteFile(logPath, log, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestHostBinding attests the host under a VM with a swtpm playing the
// host's TPM (EK certificate from a "vendor" CA, measurements the test
// makes): the host registers by its EK certificate, a VM's status carries
// the host's verdict and its vTPM's provisioning record, and when the host
// reboots into another kernel the VM is reported as running on an
// untrusted host, naming the host's PCR. A TPM whose EK certificate no
// configured CA vouches for, or another TPM than the host registered
// with, is refused.
func TestHostBinding(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	th := newTestHost(t, dir, "host kernel 6.1")
	hook := newHookReceiver(t)
	u := startConfigured(t, th.attests(Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "test-host", WebhookURL: hook.srv.URL}))
	host := client.Host("test-host")
	h, err := u.d.AttestHost(ctx)
	if err != nil || h.HostName != "test-host" || h.State != "registered" || h.Verdict != "pending" {
		t.Fatalf("host's first evidence: %+v %v", h, err)
	}

	// A VM on it, trusted by its own policy: overall still pending on the host.
	id := "0b0b0b0b-0000-4000-8000-00000000b057"
	v := u.create(t, id, "2.0")
	vmLog := filepath.Join(dir, "vm-event-log")
	os.WriteFile(vmLog, firmwareLog(t), 0o644)
	vm := dialTPM(t, v.Sockets.Data)
	boot(t, vm, firmwareLog(t))
	guest := &attestor.Agent{TPM: vm, API: u.c, Subject: client.Instance(id), EventLog: vmLog}
	if err := guest.Register(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := guest.Attest(ctx); err != nil {
		t.Fatal(err)
	}
	a, err := u.c.SetPolicy(ctx, client.Instance(id), api.PolicyRequest{Learn: true})
	if err != nil || a.Verdict != "trusted" || a.Overall != "pending" || a.Host == nil || a.Host.Verdict != "pending" {
		t.Fatalf("VM trusted, host without policy: %+v %v", a, err)
	}
	if p := a.Provisioning; p == nil || !p.Verified || p.Host != "test-host" || len(p.EKCertificates) == 0 {
		t.Fatalf("provisioning record: %+v", a.Provisioning)
	}

	// The operator learns the host's policy: one answer, trusted.
	if h, err = u.c.SetPolicy(ctx, host, api.PolicyRequest{Learn: true}); err != nil || h.Verdict != "trusted" {
		t.Fatalf("learning the host's policy: %+v %v", h, err)
	}
	if a, err = u.c.Attestation(ctx, client.Instance(id)); err != nil || a.Overall != "trusted" || a.Summary != "VM trusted on trusted host test-host" {
		t.Fatalf("VM on a trusted host: %+v %v", a, err)
	}
	// Asked for fresh evidence, the host's agent (attesting hourly here)
	// answers its long poll at once.
	req, err := u.c.RequestRefresh(ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if h, err = u.c.Attestation(ctx, host); err == nil && !h.VerifiedAt.Before(req.RequestedAt) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no fresh host evidence after asking at %s: %+v %v", req.RequestedAt, h, err)
		}
	}
	var e *client.Error
	if _, err := client.New(u.d.OperatorURL, "p1").Attestation(ctx, host); !asCode(err, &e, api.CodeForbidden) {
		t.Fatalf("a project reading the host's attestation: %v", err)
	}

	// The host reboots into another kernel.
	th.reboot(t, "host kernel 6.1 with a rootkit")
	if h, err = u.d.AttestHost(ctx); err == nil {
		t.Fatal("attesting over the connection the reboot broke: no error")
	}
	if h, err = u.d.AttestHost(ctx); err != nil || h.Verdict != "untrusted" || !strings.Contains(strings.Join(h.Reasons, ";"), "PCR 4") {
		t.Fatalf("host after the reboot: %+v %v", h, err)
	}
	a, err = u.c.Attestation(ctx, client.Instance(id))
	if err != nil || a.Verdict != "trusted" || a.Overall != "untrusted" || !strings.Contains(a.Summary, "host test-host is untrusted: PCR 4") {
		t.Fatalf("VM on an untrusted host: %+v %v", a, err)
	}
	keys, _ := u.c.VerdictKeys(ctx)
	untrusted := func(cs []verdictClaim) bool {
		return slices.ContainsFunc(cs, func(c verdictClaim) bool { return c.Overall == "untrusted" })
	}
	if !untrusted(hook.await(t, keys, untrusted)) {
		t.Fatal("no webhook said the VM's overall verdict became untrusted")
	}

	// Another TPM: from an unknown vendor, refused; from the vendor but not
	// the host's, refused.
	for _, c := range []struct {
		ca   *swtpmtest.CA
		code api.Code
	}{{swtpmtest.NewCA(t), api.CodeEKUntrusted}, {th.vendor, api.CodeEKMismatch}} {
		other, _ := swtpmtest.Manufactured(t, spec.V20, c.ca)
		swtpmtest.Start(t, other)
		impostor := &attestor.Agent{TPM: dialTPM(t, other.DataSocket()), API: u.c, Subject: host, EKCertificate: true}
		if err := impostor.Register(ctx); !asCode(err, &e, c.code) {
			t.Fatalf("registering another TPM for the host: %v, want %s", err, c.code)
		}
		if c.code != api.CodeEKMismatch {
			continue
		}
		// The operator replaced the host's TPM: forgotten, the new one registers.
		if err := client.New(u.d.OperatorURL, "p1").ForgetHost(ctx, "test-host"); !asCode(err, &e, api.CodeForbidden) {
			t.Fatalf("a project forgetting a host: %v", err)
		}
		if err := u.c.ForgetHost(ctx, "test-host"); err != nil {
			t.Fatal(err)
		}
		if a, err := u.c.Attestation(ctx, client.Instance(id)); err != nil || a.Host.Verdict != "unattested" || a.Overall != "untrusted" {
			t.Fatalf("VM on a forgotten host: %+v %v", a, err)
		}
		if err := impostor.Register(ctx); err != nil {
			t.Fatalf("the replacement TPM registering: %v", err)
		}
	}
}

// TestEnrolmentBoundToHostTPM: vtpmd agent on a host with a TPM registers
// the TPM first and enrols with the agent token it earned, so the
// enrolment is bound to it; once the host's TPM is registered, a join
// token used on a machine without that TPM enrols nothing (and stays
// usable), while the host itself enrols with it.
func TestEnrolmentBoundToHostTPM(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	host := newTestHost(t, dir, "host-kernel-1")
	caFile, certFile, keyFile := writeTestPKI(t, dir)
	s, err := StartServer(ctx, Config{DataDir: filepath.Join(dir, "server"), Listen: "127.0.0.1:0", HostName: "control",
		TLSCert: certFile, TLSKey: keyFile, HostEKCA: host.caFile}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(ctx)
	op := client.New(s.OperatorURL, "")
	joinToken := func() string {
		t.Helper()
		tok, err := op.JoinToken(ctx, "hv1", 0)
		if err != nil {
			t.Fatal(err)
		}
		f := filepath.Join(t.TempDir(), "token")
		if err := os.WriteFile(f, []byte(tok.Token), 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	agentCfg := func(name, token string) Config {
		return host.attests(Config{DataDir: filepath.Join(dir, name), HostName: "hv1", Server: s.URL, ServerCA: caFile,
			JoinTokenFile: token, PoolSize: new(0)})
	}
	enrolled := func() []string {
		t.Helper()
		var details []string
		err := s.store.View(ctx, func(tx *store.Tx) error {
			evs, err := tx.ListEvents(store.HostKey("hv1"), "")
			for _, e := range evs {
				if e.Action == "enrolled" {
					details = append(details, e.Detail)
				}
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return details
	}

	a, err := StartAgent(ctx, agentCfg("hv1", joinToken()), nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := enrolled(); len(d) != 1 || !strings.Contains(d[0], "registered TPM") {
		t.Fatalf("the first enrolment: %q, want one bound to the host's TPM", d)
	}
	if err := a.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := op.RevokeHost(ctx, "hv1"); err != nil {
		t.Fatal(err)
	}

	// The next token, carried to a machine without the host's TPM.
	token := joinToken()
	thief := Config{DataDir: filepath.Join(dir, "thief"), HostName: "hv1", Server: s.URL, JoinTokenFile: token}
	thief.Defaults()
	roots, err := client.LoadCAs(caFile)
	if err != nil {
		t.Fatal(err)
	}
	anon := client.New(s.URL, "").WithTLS(&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12})
	if _, err := loadHostCredentials(ctx, thief, anon, slog.New(slog.DiscardHandler)); client.ErrorCode(err) != api.CodeHostTPMRequired {
		t.Fatalf("enrolling without the host's TPM: %v, want %s", err, api.CodeHostTPMRequired)
	}
	a, err = StartAgent(ctx, agentCfg("hv1-again", token), nil)
	if err != nil {
		t.Fatalf("the host, with its TPM, enrolling with the token refused elsewhere: %v", err)
	}
	defer a.Shutdown(ctx)
	if d := enrolled(); len(d) != 2 || !strings.Contains(d[1], "registered TPM") {
		t.Fatalf("enrolments: %q", d)
	}
}
