package daemon

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/store"
)

// TestResizeSwtpm resizes a real vTPM on the swtpm backend through each of
// Nova's cases, with data the guest would not want to lose in its NV:
//
//   - same version and model (secret security user → host): the NV data
//     and the endorsement keys stay;
//   - tpm-tis → tpm-crb (Nova compares version and model as one pair):
//     a new TPM, with new keys and an empty NV, and a new secret; the old
//     TPM's secret survives the orphan-secret sweep and a restart while
//     the resize is pending;
//   - revert: exactly the old TPM, NV data, keys and secret, and the new
//     secret shredded;
//   - the same resize confirmed: the old state and the old secret gone;
//   - to no vTPM and confirmed: the vTPM deleted; from no vTPM and
//     reverted: the vTPM the resize made deleted.
func TestResizeSwtpm(t *testing.T) {
	dir := t.TempDir()
	u := startDaemon(t, dir)
	ctx := context.Background()
	id := "0a0a0a0a-0000-4000-8000-0000000000e1"
	v0 := u.create(t, id, "2.0")
	sealed := []byte("a disk key sealed to this vTPM")
	withTPM(t, v0.Sockets.Data, func(tpm transport.TPM) { nvWrite(t, tpm, sealed) })
	eks0 := ekKeys(t, u.c, id)
	aside := filepath.Join(dir, "vtpms", ".resize", id)

	// Same version and model: the state is kept.
	v := u.resize(t, id, map[string]string{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host"})
	if v.Resize == nil || v.Resize.Kind != "keep" || v.Resize.Status != "resized" || v.Spec.SecretSecurity != "host" || v.Phase != "active" {
		t.Fatalf("resize keeping the TPM: %+v, resize %+v", v, v.Resize)
	}
	if got := readUserNV(t, v); !bytes.Equal(got, sealed) || !slices.Equal(ekKeys(t, u.c, id), eks0) || v.SecretRef != v0.SecretRef {
		t.Fatalf("after a resize keeping the TPM: NV %q, same EKs %v, secret %s (was %s)", got, slices.Equal(ekKeys(t, u.c, id), eks0), v.SecretRef, v0.SecretRef)
	}
	if v, err := u.c.ConfirmResize(ctx, id); err != nil || v.Resize != nil {
		t.Fatalf("confirm: %+v, %v", v.Resize, err)
	}

	// Another model: a new TPM, the old one kept.
	crb := map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb", "hw:tpm_secret_security": "host"}
	v = u.resize(t, id, crb)
	if v.Resize == nil || v.Resize.Kind != "new_tpm" || v.Resize.OldSecretRef != v0.SecretRef || v.SecretRef == v0.SecretRef {
		t.Fatalf("resize to a new TPM: %+v, resize %+v", v, v.Resize)
	}
	newSecret := v.SecretRef
	v = u.waitFor(t, id, "the new TPM active", func(v api.VTPM) bool { return v.Phase == "active" })
	if slices.Equal(ekKeys(t, u.c, id), eks0) || hasUserNV(t, v) {
		t.Fatal("the new TPM has the old one's EKs or NV data")
	}
	// Neither the orphan-secret sweep nor a restart loses the old TPM.
	u.stop()
	kr := openKeyring(t, dir)
	st, err := store.Open(ctx, filepath.Join(dir, "vtpmd.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := reclaimSecrets(ctx, st, kr, 0, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	st.Close()
	if _, err := kr.Get(ctx, v0.SecretRef); err != nil {
		t.Fatalf("the old TPM's secret after the orphan sweep: %v", err)
	}
	if _, err := os.Stat(filepath.Join(aside, "identity.json")); err != nil {
		t.Fatalf("the old TPM's state set aside: %v", err)
	}
	u = startDaemon(t, dir)
	u.wait(t, id, "active")
	// A vTPM with a resize pending does not move: the old TPM stays here
	// until confirm or revert.
	var ce *client.Error
	if _, err := u.c.Migrate(ctx, id, api.MigrateRequest{}); !errors.As(err, &ce) || ce.Code != api.CodeResizePending {
		t.Fatalf("migrating a vTPM with a resize pending: %v, want %s", err, api.CodeResizePending)
	}

	// Revert: exactly the old TPM.
	if _, err := u.c.RevertResize(ctx, id); err != nil {
		t.Fatal(err)
	}
	v = u.waitFor(t, id, "the revert done", func(v api.VTPM) bool { return v.Resize == nil && v.Phase == "active" })
	if got := readUserNV(t, v); !bytes.Equal(got, sealed) || !slices.Equal(ekKeys(t, u.c, id), eks0) || v.SecretRef != v0.SecretRef || *v.Spec.Model != "tpm-tis" {
		t.Fatalf("after revert: NV %q, secret %s (was %s), spec %+v", got, v.SecretRef, v0.SecretRef, v.Spec)
	}
	if _, err := os.Stat(aside); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a state is still aside after the revert: %v", err)
	}

	// The same resize, confirmed: the old state and its secret go.
	u.resize(t, id, crb)
	v = u.waitFor(t, id, "the new TPM active", func(v api.VTPM) bool { return v.Phase == "active" })
	crbSecret := v.SecretRef
	if _, err := u.c.ConfirmResize(ctx, id); err != nil {
		t.Fatal(err)
	}
	v = u.waitFor(t, id, "the confirm done", func(v api.VTPM) bool { return v.Resize == nil })
	if _, err := os.Stat(aside); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the old state after the confirm: %v", err)
	}
	if hasUserNV(t, v) || *v.Spec.Model != "tpm-crb" || v.SecretRef != crbSecret {
		t.Fatalf("after confirm: %+v", v)
	}

	// To no vTPM: stopped, and deleted at confirm.
	v = u.resize(t, id, nil)
	if v.Resize == nil || v.Resize.Kind != "remove" || v.Desired != "stopped" {
		t.Fatalf("resize to no vTPM: %+v, resize %+v", v, v.Resize)
	}
	u.wait(t, id, "stopped")
	if _, err := u.c.ConfirmResize(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.waitGone(t, id)

	// From no vTPM: made now, deleted at revert.
	added := "0a0a0a0a-0000-4000-8000-0000000000e2"
	v, err = u.c.Resize(ctx, added, api.ResizeRequest{Project: "p1", Host: "test-host",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}})
	if err != nil || v.Resize == nil || v.Resize.Kind != "add" || v.Host != "test-host" {
		t.Fatalf("resize from no vTPM: %+v, %v", v, err)
	}
	addedSecret := u.wait(t, added, "active").SecretRef
	if _, err := u.c.RevertResize(ctx, added); err != nil {
		t.Fatal(err)
	}
	u.waitGone(t, added)

	u.stop()
	kr = openKeyring(t, dir)
	for _, s := range []struct{ what, id string }{{"the original TPM's (confirmed away)", v0.SecretRef}, {"the reverted TPM's", newSecret},
		{"the removed vTPM's", crbSecret}, {"the reverted added vTPM's", addedSecret}} {
		if _, err := kr.Get(ctx, s.id); err == nil {
			t.Errorf("%s secret %s is still in the key manager", s.what, s.id)
		}
	}
}

// resize resizes id to a flavor with extra specs flavor (nil: no vTPM).
func (u *daemonUnderTest) resize(t *testing.T, id string, flavor map[string]string) api.VTPM {
	t.Helper()
	v, err := u.c.Resize(context.Background(), id, api.ResizeRequest{ResolveRequest: api.ResolveRequest{FlavorSpecs: flavor}})
	if err != nil {
		t.Fatalf("resize %s to %v: %v", id, flavor, err)
	}
	return v
}

// waitFor waits until done holds of vTPM id, failing on an error phase.
func (u *daemonUnderTest) waitFor(t *testing.T, id, what string, done func(api.VTPM) bool) api.VTPM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	v, err := u.c.Wait(ctx, id, func(v api.VTPM) bool { return done(v) || v.Phase == "error" }, nil)
	if err != nil || v.Phase == "error" {
		t.Fatalf("waiting for %s of %s: %v (phase %s, reason %q)", what, id, err, v.Phase, v.Reason)
	}
	return v
}

// ekKeys are the public keys of vTPM id's endorsement keys, as recorded.
func ekKeys(t *testing.T, c *client.Client, id string) []string {
	t.Helper()
	ident, err := c.Identity(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, ek := range ident.EKs {
		keys = append(keys, ek.PublicKeyPEM)
	}
	return keys
}

// hasUserNV says whether the vTPM has the NV index nvWrite defines.
func hasUserNV(t *testing.T, v api.VTPM) (has bool) {
	t.Helper()
	withTPM(t, v.Sockets.Data, func(tpm transport.TPM) {
		_, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(userIndex)}.Execute(tpm)
		has = err == nil
	})
	return has
}
