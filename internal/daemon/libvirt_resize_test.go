package daemon

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/backend/libvirt"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// TestLibvirtResize resizes the vTPM of a stopped instance on a libvirt
// host to a new TPM, in both modes, with Nova's semantics: an NV index and
// counter written with tpm2-tools before; a resize to TPM 1.2 gives a new
// TPM of that version (new EKs, its state where the mode keeps a 1.2 TPM)
// while the old one is kept aside; revert brings back exactly the old TPM
// (the NV data and counter, the EKs, the secret), and a resize to tpm-crb
// confirmed removes the old TPM, state and secret. In emulator mode, with
// secret security host, the old TPM's libvirt secret goes while the new
// TPM has the instance (libvirt holds one secret per usage) and comes back,
// persistent, with its value, at revert. No guest boots: the resizes are
// cold.
func TestLibvirtResize(t *testing.T) {
	for _, mode := range []string{"emulator", "external"} {
		t.Run(mode, func(t *testing.T) { testLibvirtResize(t, mode) })
	}
}

func testLibvirtResize(t *testing.T, mode string) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	lv := connectLibvirt(t)
	dir := t.TempDir()
	u := startLibvirtDaemon(t, dir, mode)
	ctx := context.Background()
	id := uuid.NewString()
	// Where the mode keeps the TPM of a version, and the old one aside.
	state := func(version string) string {
		if mode == "external" {
			return u.d.Swtpm().Dir(id)
		}
		sub := "tpm2"
		if version == "1.2" {
			sub = "tpm1.2"
		}
		return filepath.Join("/var/lib/libvirt/swtpm", id, sub)
	}
	// libvirt's whole state directory of the domain goes aside.
	aside, asideTPM := filepath.Join("/var/lib/libvirt/swtpm/.resize", id), filepath.Join("/var/lib/libvirt/swtpm/.resize", id, "tpm2")
	if mode == "external" {
		aside = u.d.Swtpm().AsideDir(id)
		asideTPM = aside
	}
	t.Cleanup(func() { // if the test fails with the vTPM on the machine's libvirt
		os.RemoveAll(filepath.Join("/var/lib/libvirt/swtpm", id))
		os.RemoveAll(aside)
		os.Remove("/var/lib/libvirt/swtpm/.resize") // if empty: the machine's libvirt is shared
	})
	identified := func(dir string) bool {
		_, err := os.Stat(filepath.Join(dir, swtpmhost.IdentityFile))
		return err == nil
	}

	v0, err := u.c.Create(ctx, api.CreateVTPMRequest{InstanceID: id, Project: "p1", ResolveRequest: api.ResolveRequest{
		FlavorSpecs: map[string]string{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host"}}})
	if err != nil {
		t.Fatal(err)
	}
	v0 = u.wait(t, id, "active")
	if _, err := u.c.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "stopped")
	kr := openKeyring(t, dir)
	oldSecret, err := kr.Get(ctx, v0.SecretRef)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("R"), 32)
	var counter []byte
	onStateSocket(t, state("2.0"), oldSecret.Payload, func(sock string) { counter = writeNVCounted(t, sock, data) })
	eks0 := ekKeys(t, u.c, id)
	if mode == "emulator" {
		// As a start of its guest leaves it with secret security host.
		xml, err := libvirt.SecretXML(v0.SecretRef, false, false, id)
		if err != nil {
			t.Fatal(err)
		}
		s, err := lv.SecretDefineXML(xml, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := lv.SecretSetValue(s, oldSecret.Payload, 0); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { lv.SecretUndefine(s) })
	}

	// To TPM 1.2: a new TPM, the old one aside.
	v := u.resize(t, id, map[string]string{"hw:tpm_version": "1.2", "hw:tpm_secret_security": "host"})
	if v.Resize == nil || v.Resize.Kind != "new_tpm" || v.SecretRef == v0.SecretRef {
		t.Fatalf("resize to TPM 1.2: %+v, resize %+v", v, v.Resize)
	}
	u.waitFor(t, id, "the old TPM set aside", func(v api.VTPM) bool { return v.Phase == "stopped" })
	if !identified(asideTPM) || identified(state("2.0")) {
		t.Fatalf("after the resize: old TPM aside %v, still in place %v", identified(asideTPM), identified(state("2.0")))
	}
	if _, _, ok := libvirtSecret(t, lv, v0.SecretRef); ok {
		t.Fatal("the old TPM's libvirt secret is still defined while the new TPM has the instance")
	}
	// The old TPM aside is no drift (the host's libvirt is shared with
	// other tests, so only this vTPM's objects count).
	drift, err := u.c.Drift(ctx, "lv-host", false)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range drift.Findings {
		if f.InstanceID == id || strings.Contains(f.Object, id) || strings.Contains(f.Object, ".resize") {
			t.Fatalf("drift while the old TPM is aside: %+v", f)
		}
	}
	if _, err := u.c.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	v = u.wait(t, id, "active")
	if v.Spec.Version != "1.2" || !identified(state("1.2")) || slices.Equal(ekKeys(t, u.c, id), eks0) {
		t.Fatalf("the new TPM: version %s, state in %s %v, old EKs %v", v.Spec.Version, state("1.2"), identified(state("1.2")), slices.Equal(ekKeys(t, u.c, id), eks0))
	}
	if _, err := u.c.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "stopped")

	// Revert: exactly the old TPM.
	if _, err := u.c.RevertResize(ctx, id); err != nil {
		t.Fatal(err)
	}
	v = u.waitFor(t, id, "the revert done", func(v api.VTPM) bool { return v.Resize == nil && v.Phase == "stopped" })
	if v.Spec.Version != "2.0" || v.SecretRef != v0.SecretRef || !slices.Equal(ekKeys(t, u.c, id), eks0) {
		t.Fatalf("after the revert: %+v", v)
	}
	if _, err := os.Stat(aside); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a state is still aside after the revert: %v", err)
	}
	if mode == "emulator" && identified(state("1.2")) {
		t.Fatal("the new TPM's state survived the revert")
	}
	onStateSocket(t, state("2.0"), oldSecret.Payload, func(sock string) {
		if got := readNVData(t, sock); !bytes.Equal(got, data) {
			t.Fatalf("NV index after the revert = %q, want %q", got, data)
		}
		if got := readCounter(t, sock); !bytes.Equal(got, counter) {
			t.Fatalf("NV counter after the revert = %x, want %x", got, counter)
		}
	})
	if mode == "emulator" {
		if value, hidden, ok := libvirtSecret(t, lv, v0.SecretRef); !ok || hidden || !bytes.Equal(value, oldSecret.Payload) {
			t.Fatalf("the old TPM's libvirt secret after the revert: defined %v, ephemeral or private %v", ok, hidden)
		}
	}

	// To tpm-crb, confirmed: the old TPM goes.
	v = u.resize(t, id, map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb", "hw:tpm_secret_security": "host"})
	if v.Resize == nil || v.Resize.Kind != "new_tpm" {
		t.Fatalf("resize to tpm-crb: %+v", v.Resize)
	}
	u.waitFor(t, id, "the old TPM set aside", func(v api.VTPM) bool { return v.Phase == "stopped" })
	if _, err := u.c.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	v = u.wait(t, id, "active")
	crbEKs := ekKeys(t, u.c, id)
	if *v.Spec.Model != "tpm-crb" || slices.Equal(crbEKs, eks0) || !identified(state("2.0")) {
		t.Fatalf("the new TPM: %+v, old EKs %v", v, slices.Equal(crbEKs, eks0))
	}
	if _, err := u.c.ConfirmResize(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.waitFor(t, id, "the confirm done", func(v api.VTPM) bool { return v.Resize == nil })
	if _, err := os.Stat(aside); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the old state after the confirm: %v", err)
	}
	if _, err := kr.Get(ctx, v0.SecretRef); !errors.Is(err, keyring.ErrNotFound) {
		t.Fatalf("the old TPM's secret after the confirm: %v", err)
	}
	if _, _, ok := libvirtSecret(t, lv, v0.SecretRef); ok {
		t.Fatal("the old TPM's libvirt secret after the confirm")
	}
	if !slices.Equal(ekKeys(t, u.c, id), crbEKs) || !identified(state("2.0")) {
		t.Fatal("the confirm touched the new TPM")
	}

	if _, err := u.c.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.waitGone(t, id)
	if mode == "emulator" {
		if _, err := os.Stat(filepath.Join("/var/lib/libvirt/swtpm", id)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("the state after the delete: %v", err)
		}
	}
}
