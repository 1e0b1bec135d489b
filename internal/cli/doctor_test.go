package cli

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/daemon"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// TestDoctor runs vtpmctl doctor against a real all-in-one daemon (swtpm
// backend) with a TPM state directory no record refers to.
func TestDoctor(t *testing.T) {
	swtpmtest.Require(t)
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d, err := daemon.StartAllInOne(ctx, daemon.Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "h1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown(context.Background())
	go d.Run(ctx) // its agent answers drift checks
	base := []string{"--server", d.OperatorURL}

	if code, out, errOut := run(t, append(base, "doctor")...); code != ExitOK || out != "" || !strings.Contains(errOut, "no drift") {
		t.Fatalf("doctor on a clean host: %d %q %q", code, out, errOut)
	}
	orphan := filepath.Join(dir, "vtpms", "5b1f8c2e-9a0d-4c3b-8e7f-1a2b3c4d5e6f")
	if err := os.MkdirAll(orphan, 0o700); err != nil {
		t.Fatal(err)
	}
	code, out, _ := run(t, append(base, "doctor")...)
	if code != ExitFailed || !strings.Contains(out, "orphan_state") || !strings.Contains(out, orphan) {
		t.Fatalf("doctor with an orphan: %d %q", code, out)
	}
	if _, err := os.Stat(orphan); err != nil {
		t.Fatal("doctor without --delete-orphans deleted the orphan")
	}
	code, out, _ = run(t, append(base, "doctor", "--delete-orphans", "-o", "json")...)
	var drifts []api.Drift
	if code != ExitOK || json.Unmarshal([]byte(out), &drifts) != nil || len(drifts) != 1 || len(drifts[0].Findings) != 1 || !drifts[0].Findings[0].Deleted {
		t.Fatalf("doctor --delete-orphans: %d %q", code, out)
	}
	if _, err := os.Stat(orphan); !os.IsNotExist(err) {
		t.Fatal("the orphan is still there")
	}
	if code, _, errOut := run(t, append(base, "--project", "p1", "doctor")...); code != ExitFailed || !strings.Contains(errOut, string(api.CodeForbidden)) {
		t.Fatalf("doctor as a tenant: %d %q", code, errOut)
	}
}

// TestAttestationCommands: status of a guest that never registered, and a
// policy with nothing to learn from, against a real daemon.
func TestAttestationCommands(t *testing.T) {
	swtpmtest.Require(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d, err := daemon.StartAllInOne(ctx, daemon.Config{DataDir: t.TempDir(), Listen: "127.0.0.1:0", HostName: "h1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown(context.Background())
	base := []string{"--server", d.OperatorURL}
	id := "5b1f8c2e-9a0d-4c3b-8e7f-1a2b3c4d5e6f"
	if code, _, errOut := run(t, append(base, "create", "--instance", id, "--for-project", "p1", "--flavor-spec", "hw:tpm_version=2.0", "--wait=false")...); code != ExitOK {
		t.Fatalf("create: %d %s", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "attestation", "status", id)...); code != ExitNotFound || !strings.Contains(errOut, "never registered") {
		t.Fatalf("status before registration: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "host", "status", "h1")...); code != ExitNotFound || !strings.Contains(errOut, "host has never registered") {
		t.Fatalf("host status before the host's TPM registered: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "host", "status", "h2")...); code != ExitNotFound || !strings.Contains(errOut, "No such host") {
		t.Fatalf("status of an unknown host: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "--project", "p1", "host", "status", "h1")...); code == ExitOK || !strings.Contains(errOut, string(api.CodeForbidden)) {
		t.Fatalf("a project reading a host's attestation: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "policy", "learn", id, "--pcrs", "0,x")...); code != ExitUsage || !strings.Contains(errOut, "not a PCR number") {
		t.Fatalf("bad --pcrs: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "policy", "learn", id)...); code != ExitConflict || !strings.Contains(errOut, string(api.CodeNoEvidence)) {
		t.Fatalf("learn without evidence: %d %q", code, errOut)
	}

	// Named policies: create, list, show, apply, delete; the history.
	digest := strings.Repeat("ab", 32)
	if code, out, errOut := run(t, append(base, "policy", "create", "golden", "--pcr", "0="+digest, "--pcr", "4="+digest)...); code != ExitOK || !strings.Contains(out, "PCR 4") {
		t.Fatalf("policy create: %d %q %q", code, out, errOut)
	}
	if code, _, errOut := run(t, append(base, "policy", "create", "golden", "--pcr", "0="+digest)...); code != ExitConflict || !strings.Contains(errOut, string(api.CodeAlreadyExists)) {
		t.Fatalf("policy create twice: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "policy", "create", "bad", "--pcr", "zero")...); code != ExitUsage || !strings.Contains(errOut, "N=SHA256HEX") {
		t.Fatalf("policy create --pcr zero: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "--project", "p1", "policy", "create", "mine", "--from", id)...); code != ExitNotFound || !strings.Contains(errOut, "to learn from") {
		t.Fatalf("policy create --from without evidence: %d %q", code, errOut)
	}
	if code, out, _ := run(t, append(base, "--project", "p1", "policy", "list")...); code != ExitOK || !strings.Contains(out, "golden") || !strings.Contains(out, "0,4") {
		t.Fatalf("policy list: %d %q", code, out)
	}
	if code, out, _ := run(t, append(base, "-o", "json", "policy", "show", "golden")...); code != ExitOK || !strings.Contains(out, `"4": "`+digest) {
		t.Fatalf("policy show: %d %q", code, out)
	}
	if code, out, errOut := run(t, append(base, "--project", "p1", "policy", "apply", "golden", id)...); code != ExitOK || !strings.Contains(out, "golden: PCRs 0,4") {
		t.Fatalf("policy apply: %d %q %q", code, out, errOut)
	}
	if code, _, errOut := run(t, append(base, "policy", "apply", "golden")...); code != ExitUsage {
		t.Fatalf("policy apply without a subject: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "--project", "p1", "policy", "delete", "golden")...); code == ExitOK || !strings.Contains(errOut, string(api.CodeForbidden)) {
		t.Fatalf("a project deleting the operator's policy: %d %q", code, errOut)
	}
	if code, out, _ := run(t, append(base, "policy", "delete", "golden")...); code != ExitOK || !strings.Contains(out, "deleted") {
		t.Fatalf("policy delete: %d %q", code, out)
	}
	if code, _, errOut := run(t, append(base, "policy", "show", "golden")...); code != ExitNotFound {
		t.Fatalf("policy show after delete: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "attestation", "refresh", id)...); code != ExitConflict || !strings.Contains(errOut, string(api.CodeNotRegistered)) {
		t.Fatalf("refresh before the guest registered: %d %q", code, errOut)
	}
	if code, out, _ := run(t, append(base, "attestation", "history", id)...); code != ExitOK || !strings.Contains(out, "policy golden applied") {
		t.Fatalf("attestation history: %d %q", code, out)
	}

	// Hyper-V and key-manager commands (no Hyper-V host here: a libvirt
	// vTPM has no plan).
	if code, _, errOut := run(t, append(base, "hyperv", "plan", id)...); code != ExitConflict || !strings.Contains(errOut, string(api.CodeNotHyperV)) {
		t.Fatalf("hyperv plan of a non-Hyper-V vTPM: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "--project", "p1", "hyperv", "key", "create")...); code != ExitUsage || !strings.Contains(errOut, "--payload-file") {
		t.Fatalf("hyperv key create without a file: %d %q", code, errOut)
	}
	keyFile := filepath.Join(t.TempDir(), "owner.pfx.b64")
	os.WriteFile(keyFile, []byte("S0VZLU1BVEVSSUFM\n"), 0o600)
	if code, out, errOut := run(t, append(base, "--project", "p1", "hyperv", "key", "create", "--payload-file", keyFile)...); code != ExitOK || len(strings.TrimSpace(out)) != 36 || strings.Contains(out, "S0VZ") {
		t.Fatalf("hyperv key create: %d %q %q", code, out, errOut)
	}
	// Secrets, released only to attested instances: by name, which the
	// guest asks for.
	if code, out, errOut := run(t, append(base, "--project", "p1", "secret", "create", "--payload-file", keyFile, "--release-to", id)...); code != ExitUsage ||
		!strings.Contains(errOut, "NAME") || !strings.Contains(errOut, "hyperv key create") || out != "" {
		t.Fatalf("secret create without a NAME: %d %q %q", code, out, errOut)
	}
	if code, _, errOut := run(t, append(base, "--project", "p1", "secret", "create", "disk")...); code != ExitUsage || !strings.Contains(errOut, "--payload-file") {
		t.Fatalf("secret create without a file: %d %q", code, errOut)
	}
	if code, _, errOut := run(t, append(base, "--project", "p1", "secret", "create", "disk", "--payload-file", keyFile)...); code != ExitUsage || !strings.Contains(errOut, "--release-to") {
		t.Fatalf("secret create NAME without whom it is for: %d %q", code, errOut)
	}
	if code, out, errOut := run(t, append(base, "--project", "p1", "secret", "create", "disk", "--payload-file", keyFile, "--release-to", id, "--max-evidence-age", "90s")...); code != ExitOK ||
		!strings.Contains(out, id) || !strings.Contains(out, "1m30s") || strings.Contains(out, "S0VZ") {
		t.Fatalf("secret create disk: %d %q %q", code, out, errOut)
	}
	if code, _, errOut := run(t, append(base, "--project", "p1", "secret", "create", "disk", "--payload-file", keyFile, "--release-to", id)...); code != ExitConflict || !strings.Contains(errOut, string(api.CodeAlreadyExists)) {
		t.Fatalf("secret create disk again: %d %q", code, errOut)
	}
	if code, out, _ := run(t, append(base, "--project", "p1", "secret", "list")...); code != ExitOK || !strings.Contains(out, "disk") {
		t.Fatalf("secret list: %d %q", code, out)
	}
	if code, out, _ := run(t, append(base, "--project", "p2", "secret", "list")...); code != ExitOK || strings.Contains(out, "disk") {
		t.Fatalf("another project's secret list: %d %q", code, out)
	}
	if code, _, errOut := run(t, append(base, "--project", "p2", "secret", "show", "disk")...); code != ExitNotFound {
		t.Fatalf("another project's secret show: %d %q", code, errOut)
	}
	if code, out, _ := run(t, append(base, "--project", "p1", "-o", "json", "secret", "show", "disk")...); code != ExitOK || !strings.Contains(out, `"max_evidence_age": "1m30s"`) || strings.Contains(out, "S0VZ") {
		t.Fatalf("secret show: %d %q", code, out)
	}
	if code, out, _ := run(t, append(base, "--project", "p1", "secret", "delete", "disk")...); code != ExitOK || !strings.Contains(out, "deleted") {
		t.Fatalf("secret delete: %d %q", code, out)
	}
	if code, _, _ := run(t, append(base, "--project", "p1", "secret", "show", "disk")...); code != ExitNotFound {
		t.Fatalf("secret show after delete: %d", code)
	}
	if code, out, errOut := run(t, append(base, "hyperv", "host-token", "h1")...); code != ExitOK || len(strings.TrimSpace(out)) < 40 {
		t.Fatalf("hyperv host-token: %d %q %q", code, out, errOut)
	}
}
