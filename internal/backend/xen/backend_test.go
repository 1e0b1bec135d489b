package xen

import (
	"bytes"
	"context"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/spec"
)

func newBackend(t *testing.T, capacity int) (*Backend, *Group, Layout) {
	t.Helper()
	dir := t.TempDir()
	g, err := OpenGroup(dir, "Group1", capacity)
	if err != nil {
		t.Fatal(err)
	}
	layout := Layout{ImageDir: dir + "/images", ConfigDir: dir + "/configs"}
	b, err := New(layout, g, nil)
	if err != nil {
		t.Fatal(err)
	}
	return b, g, layout
}

func vtpm(id string, v spec.Version) agent.VTPM {
	return agent.VTPM{InstanceID: id, Spec: spec.Spec{Version: v, Model: spec.TIS}}
}

func TestProvisionAndDelete(t *testing.T) {
	ctx := context.Background()
	b, g, layout := newBackend(t, 1)
	if caps, _ := b.Capabilities(ctx); !slices.Equal(spec.HostTraits(caps).List(), []string{
		"COMPUTE_SECURITY_TPM_1_2", "COMPUTE_SECURITY_TPM_SECRET_SECURITY_HOST", "COMPUTE_SECURITY_TPM_TIS"}) {
		t.Fatalf("traits: %v", spec.HostTraits(caps).List())
	}
	v := vtpm(instance, spec.V12)
	if eks, err := b.Ensure(ctx, v, nil); err != nil || eks != nil {
		t.Fatalf("ensure: %v %v", eks, err)
	}
	registered, _ := g.Registered(ctx)
	if len(registered) != 1 || registered[0].Owner != "vtpm-"+instance {
		t.Fatalf("registered: %v", registered)
	}
	d := layout.StubDomain(instance, registered[0].UUID)
	info, err := os.Stat(d.Image)
	if err != nil || info.Size() != 2*1024*1024 {
		t.Fatalf("image: %v %v", info, err)
	}
	if img, _ := os.ReadFile(d.Image); !bytes.Equal(img, make([]byte, ImageSize)) {
		t.Fatal("the image is not zero-filled")
	}
	xlPath, xmlPath, guestXL, guestXML := layout.Files(instance)
	for path, want := range map[string][]byte{xlPath: d.XL(), guestXL: d.GuestXL()} {
		if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: %q %v", path, got, err)
		}
	}
	for _, path := range []string{xmlPath, guestXML} {
		if got, err := os.ReadFile(path); err != nil || !strings.Contains(string(got), "<vtpm backend=") {
			t.Fatalf("%s: %q %v", path, got, err)
		}
	}

	// Again (a restart): the same UUID, and the vTPM's NVRAM untouched.
	os.WriteFile(d.Image, append([]byte("nvram"), make([]byte, ImageSize-5)...), 0o600)
	if _, err := b.Ensure(ctx, v, nil); err != nil {
		t.Fatal(err)
	}
	if again, _ := g.Registered(ctx); !slices.Equal(again, registered) {
		t.Fatalf("registered after a second ensure: %v", again)
	}
	if img, _ := os.ReadFile(d.Image); !bytes.HasPrefix(img, []byte("nvram")) {
		t.Fatal("the second ensure rewrote the vTPM's disk")
	}

	// Refusals: a TPM 2.0, a full group; nothing is left behind.
	if _, err := b.Ensure(ctx, vtpm("0b0b0b0b-0000-4000-8000-00000000b057", spec.V20), nil); err == nil || !strings.Contains(err.Error(), "TPM 1.2") {
		t.Fatalf("a TPM 2.0 on Xen: %v", err)
	}
	other := vtpm("0c0c0c0c-0000-4000-8000-00000000c0c0", spec.V12)
	if _, err := b.Ensure(ctx, other, nil); err == nil || !strings.Contains(err.Error(), "full") {
		t.Fatalf("beyond the group's capacity: %v", err)
	}
	if otherXL, _, _, _ := layout.Files(other.InstanceID); fileExists(otherXL) {
		t.Fatal("a refused vTPM left a configuration")
	}

	if err := b.Destroy(ctx, v); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{d.Image, xlPath, xmlPath, guestXL, guestXML} {
		if fileExists(path) {
			t.Errorf("%s outlived delete", path)
		}
	}
	if left, _ := g.Registered(ctx); len(left) != 0 {
		t.Fatalf("UUIDs after delete: %v", left)
	}
	if err := b.Destroy(ctx, v); err != nil {
		t.Fatalf("deleting twice: %v", err)
	}
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// Drift: a UUID registered by a crash before its stub domain was written,
// a stub domain with no record, a record whose stub domain is gone.
func TestDrift(t *testing.T) {
	ctx := context.Background()
	b, g, layout := newBackend(t, 10)
	kept, orphan := vtpm(instance, spec.V12), vtpm("0c0c0c0c-0000-4000-8000-00000000c0c0", spec.V12)
	for _, v := range []agent.VTPM{kept, orphan} {
		if _, err := b.Ensure(ctx, v, nil); err != nil {
			t.Fatal(err)
		}
	}
	lost, _ := g.Register(ctx, "vtpm-0e0e0e0e-0000-4000-8000-00000000e0e0") // a crash before its configuration
	if _, err := g.Register(ctx, UUIDServiceOwner); err != nil {            // the caller's: never drift
		t.Fatal(err)
	}
	gone := vtpm("0d0d0d0d-0000-4000-8000-00000000d0d0", spec.V12)
	records := func(context.Context) ([]agent.VTPM, error) { return []agent.VTPM{kept, gone}, nil }

	kinds := func(repair bool) map[string]string {
		fs, err := b.Drift(ctx, records, repair)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, f := range fs {
			out[f.Kind] = f.Object
			if repair != f.Deleted && f.Kind != "missing_stub_domain" {
				t.Errorf("%s: deleted=%v with repair=%v", f.Kind, f.Deleted, repair)
			}
		}
		return out
	}
	orphanXL, _, _, _ := layout.Files(orphan.InstanceID)
	goneXL, _, _, _ := layout.Files(gone.InstanceID)
	want := map[string]string{"orphan_stub_domain": orphanXL, "orphan_uuid": lost.String(), "missing_stub_domain": goneXL}
	if got := kinds(false); len(got) != 3 || got["orphan_stub_domain"] != want["orphan_stub_domain"] || got["orphan_uuid"] != want["orphan_uuid"] || got["missing_stub_domain"] != want["missing_stub_domain"] {
		t.Fatalf("drift: %v, want %v", got, want)
	}
	kinds(true)
	if got := kinds(false); len(got) != 1 || got["missing_stub_domain"] == "" {
		t.Fatalf("after repair: %v", got)
	}
	if left, _ := g.Registered(ctx); len(left) != 2 || left[1].Owner != UUIDServiceOwner {
		t.Fatalf("UUIDs after repair: %v", left)
	}
}
