package daemon

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/backend/xen"
)

// TestXenHost runs vtpmd as the agent of a Xen host (the domains are
// configurations, not started: no Xen here): it offers TPM 1.2 over TIS
// with host secret security only, provisions a stub domain per vTPM,
// serves the UUID service from the same VTPM manager group, refuses
// clearly when the group is full, and deletes everything it made.
func TestXenHost(t *testing.T) {
	dir := t.TempDir()
	images := filepath.Join(dir, "nova_vtpms")
	u := startConfigured(t, Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "xen-host", Backend: "xen",
		Xen: XenConfig{ImageDir: images, GroupCapacity: 2, UUIDListen: "127.0.0.1:0"}})
	ctx := context.Background()

	hosts, err := u.c.Hosts(ctx)
	if err != nil || len(hosts.Items) != 1 || !slices.Equal(hosts.Items[0].Traits,
		[]string{"COMPUTE_SECURITY_TPM_1_2", "COMPUTE_SECURITY_TPM_SECRET_SECURITY_HOST", "COMPUTE_SECURITY_TPM_TIS"}) {
		t.Fatalf("hosts: %+v %v", hosts, err)
	}
	create := func(id string, specs map[string]string) error {
		_, err := u.c.Create(ctx, api.CreateVTPMRequest{InstanceID: id, Project: "p1", ResolveRequest: api.ResolveRequest{FlavorSpecs: specs}})
		return err
	}
	xenSpecs := map[string]string{"hw:tpm_version": "1.2", "hw:tpm_model": "tpm-tis", "hw:tpm_secret_security": "host"}

	// Requests a Xen host cannot serve are not placed on it.
	var e *client.Error
	for _, specs := range []map[string]string{
		{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host"},
		{"hw:tpm_version": "1.2", "hw:tpm_model": "tpm-tis"}, // user secret security
	} {
		if err := create("0a0a0a0a-0000-4000-8000-00000000a0a0", specs); !asCode(err, &e, api.CodeNoValidHost) {
			t.Fatalf("%v placed: %v", specs, err)
		}
	}

	id := "3f1e0a52-7c1b-4d25-9a5e-0c7d2b9e4a11"
	if err := create(id, xenSpecs); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "active")
	stub := filepath.Join(images, "vtpm-"+id)
	cfg, err := os.ReadFile(stub + ".cfg")
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := xen.ParseXL(cfg)
	if err != nil || parsed["name"] != "vtpm-"+id || !strings.HasPrefix(parsed["vtpm"].([]string)[0], "backend=vtpmmgr,uuid=") {
		t.Fatalf("stub domain configuration: %v %v", parsed, err)
	}
	if info, err := os.Stat(stub + ".img"); err != nil || info.Size() != xen.ImageSize {
		t.Fatalf("stub domain disk: %v %v", info, err)
	}

	// The UUID service takes the group's last place; the next vTPM is
	// refused, saying why.
	resp, err := http.Get("http://" + u.d.XenUUIDAddr + "/")
	var served struct{ UUID string }
	if err != nil || resp.StatusCode != 200 || json.NewDecoder(resp.Body).Decode(&served) != nil || served.UUID == "" {
		t.Fatalf("UUID service: %v %v", resp, err)
	}
	resp.Body.Close()
	full := "0b0b0b0b-0000-4000-8000-00000000b0b0"
	if err := create(full, xenSpecs); err != nil {
		t.Fatal(err)
	}
	if v := u.wait(t, full, "error"); !strings.Contains(v.Reason, "group is full") {
		t.Fatalf("a vTPM beyond the group's capacity: %q", v.Reason)
	}
	if d, err := u.c.Drift(ctx, "xen-host", false); err != nil || len(d.Findings) != 1 || d.Findings[0].Kind != "missing_stub_domain" {
		t.Fatalf("drift: %+v %v", d, err)
	}

	if _, err := u.c.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := u.c.Delete(ctx, full); err != nil {
		t.Fatal(err)
	}
	for _, gone := range []string{id, full} {
		u.waitGone(t, gone)
	}
	left, _ := filepath.Glob(filepath.Join(images, "*"))
	if len(left) != 0 {
		t.Fatalf("left after delete: %v", left)
	}
	// The freed place serves the next vTPM.
	if err := create(id, xenSpecs); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "active")
}
