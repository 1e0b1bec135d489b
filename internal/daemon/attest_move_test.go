package daemon

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// ranAnHour sets the TPM's clock an hour ahead (TPM2_ClockSet, TCG TPM 2.0
// Library Part 3 §29.2, which go-tpm does not wrap), as if the guest had
// run that long: the verifier's floor of the clock then lies well above
// what a state put back to an earlier one shows in its next quote.
func ranAnHour(t *testing.T, tpm transport.TPM) {
	t.Helper()
	now, err := tpm2.ReadClock{}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	cmd := binary.BigEndian.AppendUint16(nil, uint16(tpm2.TPMSTSessions))
	cmd = binary.BigEndian.AppendUint32(cmd, 35)
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpm2.TPMCCClockSet))
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpm2.TPMRHOwner))
	cmd = binary.BigEndian.AppendUint32(cmd, 9) // the password session: empty owner auth
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpm2.TPMRSPW))
	cmd = append(cmd, 0, 0, 0, 0, 0)
	cmd = binary.BigEndian.AppendUint64(cmd, now.CurrentTime.ClockInfo.Clock+3_600_000)
	rsp, err := tpm.Send(cmd)
	if err != nil || len(rsp) < 10 || binary.BigEndian.Uint32(rsp[6:10]) != 0 {
		t.Fatalf("TPM2_ClockSet: %x %v", rsp, err)
	}
}

// TestMovedAttestation registers a guest's attestation (the guest agent's
// code on the vTPM's socket, booted with a real firmware event log) and
// learns its policy, then moves the vTPM: a cold migration, a shelve and
// an unshelve on the other host, a resize that keeps the TPM (reverted,
// then confirmed), a restore of its backup, and an
// evacuation of its host from that backup. After each move the guest
// boots again on the vTPM where it is now, and the same agent, with the
// token of its one registration, quotes with the AK the moved TPM makes
// (the same key: the TPM's seeds moved with it): trusted, never
// registered again.
func TestMovedAttestation(t *testing.T) {
	swtpmtest.Require(t)
	c := newCluster(t)
	ctx := context.Background()
	a := c.addAgent("hv-a", 2)
	c.addAgent("hv-b", 2)
	id := clusterID(120)
	if _, err := c.create(id); err != nil {
		t.Fatal(err)
	}
	v := c.wait(id, "active")
	log := firmwareLog(t)
	logPath := filepath.Join(t.TempDir(), "binary_bios_measurements")
	if err := os.WriteFile(logPath, log, 0o644); err != nil {
		t.Fatal(err)
	}
	roots, err := client.LoadCAs(c.serverCA)
	if err != nil {
		t.Fatal(err)
	}
	network := client.New("https://"+c.addr, "").WithTLS(&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12})
	tpm := dialTPM(t, v.Sockets.Data)
	boot(t, tpm, log)
	guest := &attestor.Agent{TPM: tpm, API: network, Subject: client.Instance(id), EventLog: logPath}
	if err := guest.Register(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := guest.Attest(ctx); err != nil {
		t.Fatal(err)
	}
	if a, err := c.op.SetPolicy(ctx, client.Instance(id), api.PolicyRequest{Learn: true}); err != nil || a.Verdict != "trusted" {
		t.Fatalf("learning: %+v %v", a, err)
	}
	registered, err := c.op.Attestation(ctx, client.Instance(id))
	if err != nil {
		t.Fatal(err)
	}

	// attested boots the guest on the vTPM where it is now and has the
	// agent attest: trusted, under the registration made before the moves.
	attested := func(after string) {
		t.Helper()
		v := c.wait(id, "active")
		tpm := dialTPM(t, v.Sockets.Data)
		boot(t, tpm, log)
		guest.TPM = tpm
		got, err := guest.Attest(ctx)
		if err != nil || got.State != "registered" || got.Verdict != "trusted" {
			t.Fatalf("after %s (on %s): %+v %v", after, v.Host, got, err)
		}
		if !got.RegisteredAt.Equal(registered.RegisteredAt) {
			t.Fatalf("after %s: registered at %s, before the moves at %s", after, got.RegisteredAt, registered.RegisteredAt)
		}
		t.Logf("after %s: trusted on %s with the registration of %s", after, v.Host, registered.RegisteredAt)
	}
	// stopped powers the guest off (its OS shuts the TPM down, orderly)
	// and stops the vTPM.
	stopped := func() {
		t.Helper()
		if _, err := (tpm2.Shutdown{ShutdownType: tpm2.TPMSUClear}).Execute(guest.TPM); err != nil {
			t.Fatal(err)
		}
		if _, err := c.op.Stop(ctx, id); err != nil {
			t.Fatal(err)
		}
		c.wait(id, "stopped")
	}

	stopped()
	if _, err := c.op.Migrate(ctx, id, api.MigrateRequest{Host: "hv-b"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.op.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	attested("a cold migration")

	stopped()
	if _, err := c.op.Shelve(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := c.op.Unshelve(ctx, id, "hv-a"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.op.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	attested("a shelve and an unshelve")

	// Resized with its TPM kept (secret security user to host): reverted,
	// then resized again and confirmed.
	toHost := api.ResizeRequest{ResolveRequest: api.ResolveRequest{
		FlavorSpecs: map[string]string{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host"}}}
	for _, end := range []struct {
		name string
		do   func(context.Context, string) (api.VTPM, error)
	}{{"a resize reverted", c.op.RevertResize}, {"a resize confirmed", c.op.ConfirmResize}} {
		stopped()
		if _, err := c.op.Resize(ctx, id, toHost); err != nil {
			t.Fatal(err)
		}
		if _, err := end.do(ctx, id); err != nil {
			t.Fatalf("%s: %v", end.name, err)
		}
		if _, err := c.op.Start(ctx, id); err != nil {
			t.Fatal(err)
		}
		attested(end.name)
	}

	// Backed up while stopped, and booted again after: the restore takes
	// the TPM, its counters too, back to before that boot, which the
	// verifier saw. vtpmd made that rollback, on the operator's word: the
	// verifier's floor follows it.
	stopped()
	if _, err := c.op.CreateBackup(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := c.op.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	attested("a backup")
	ranAnHour(t, guest.TPM)
	if got, err := guest.Attest(ctx); err != nil || got.Verdict != "trusted" {
		t.Fatalf("an hour on: %+v %v", got, err)
	}
	stopped()
	if _, err := c.op.RestoreBackup(ctx, id, api.RestoreRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.op.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	attested("a restore of its backup")
	if !eventWith(t, c, id, "attestation counters rebased", "restored from its backup") {
		t.Fatal("no event says the verifier's floor of the TPM counters moved")
	}

	// Backed up while the guest runs; its host is lost.
	if _, err := c.op.CreateBackup(ctx, id); err != nil {
		t.Fatal(err)
	}
	killHost(a)
	if _, err := c.op.Evacuate(ctx, "hv-a", api.EvacuateRequest{Force: true}, nil); err != nil {
		t.Fatal(err)
	}
	attested("an evacuation of its host")

	// A rollback vtpmd did not make is still caught: the state of an
	// earlier boot put in place behind its back.
	v = c.wait(id, "active")
	stopped()
	earlier := saveState(t, c.agents[v.Host].dir, id)
	if _, err := c.op.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	attested("another boot")
	ranAnHour(t, guest.TPM)
	if got, err := guest.Attest(ctx); err != nil || got.Verdict != "trusted" {
		t.Fatalf("an hour on: %+v %v", got, err)
	}
	stopped()
	earlier()
	if _, err := c.op.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	v = c.wait(id, "active")
	tpm = dialTPM(t, v.Sockets.Data)
	boot(t, tpm, log)
	guest.TPM = tpm
	if got, err := guest.Attest(ctx); err != nil || got.Verdict != "untrusted" || !strings.Contains(strings.Join(got.Reasons, " "), "back") {
		t.Fatalf("a TPM state rolled back behind vtpmd's back: %+v %v", got, err)
	}
}
