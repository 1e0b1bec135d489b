package server

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/vtpms"
)

// Hyper-V: keys are checked before anything is made; the plan names them
// by reference; a host fetches them with its credential only for its own
// instances; key material never appears in plans, errors or logs.
func TestHyperV(t *testing.T) {
	var logs bytes.Buffer
	f := newFixtureWith(t, setup{log: slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		hyperV: vtpms.HyperVOptions{PublicURL: "https://vtpmd.example:8780"}})
	caps := spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V20}, HyperVGen2: true}
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		return tx.PutHost(&store.Host{Name: "hv1", Traits: spec.HostTraits(caps).List(), Capacity: 10, Backend: "hyperv"})
	})
	if err != nil {
		t.Fatal(err)
	}
	// Every response body, to check none carries key material.
	var bodies []string
	call := func(method, path, project, token string, body any, out any) int {
		t.Helper()
		var raw []byte
		code := f.call(t, method, path, project, body, &raw)
		if token != "" {
			req, _ := http.NewRequest(method, f.url+path, nil)
			req.Header.Set("Authorization", "Bearer "+token)
			resp, err := f.http.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			raw, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			code = resp.StatusCode
		}
		bodies = append(bodies, string(raw))
		if out != nil {
			if err := json.Unmarshal(raw, out); err != nil {
				t.Fatalf("%s %s: %d %s", method, path, code, raw)
			}
		}
		return code
	}

	signing := base64.StdEncoding.EncodeToString([]byte("KEY-MATERIAL: owner signing PFX"))
	var own, foreign api.Secret
	if code := call("POST", "/v1/secrets", "p1", "", api.CreateSecretRequest{Payload: signing}, &own); code != 201 || own.Project != "p1" {
		t.Fatalf("secret: %d %+v", code, own)
	}
	call("POST", "/v1/secrets", "p2", "", api.CreateSecretRequest{Payload: "KEY-MATERIAL: p2's"}, &foreign)
	var e api.ErrorBody
	if code := call("POST", "/v1/secrets", "", "", api.CreateSecretRequest{Payload: "KEY-MATERIAL: no project"}, &e); code != 400 || e.Error.Code != api.CodeInvalidProject {
		t.Fatalf("secret without a project: %d %+v", code, e)
	}
	if code := call("POST", "/v1/secrets", "p1", "", api.CreateSecretRequest{Payload: "KEY-MATERIAL" + strings.Repeat("x", 10000)}, &e); code != 400 || e.Error.Code != api.CodeInvalidPayload {
		t.Fatalf("oversized secret: %d %+v", code, e)
	}
	if code := call("GET", "/v1/secrets/"+own.ID, "p2", "", nil, &e); code != 404 {
		t.Fatalf("another project reads the secret's metadata: %d", code)
	}

	hypervVTPM := func(id string, keys ...string) api.CreateVTPMRequest {
		return api.CreateVTPMRequest{InstanceID: id, Project: "p1", ResolveRequest: api.ResolveRequest{ImageProps: map[string]string{
			"hypervisor_type": "hyperv", "hw_machine_type": "hyperv-gen2", "os_vtpm": "required", "os_vtpm_keys": strings.Join(keys, ",")}}}
	}
	var extra [2]api.Secret
	for i := range extra {
		call("POST", "/v1/secrets", "p1", "", api.CreateSecretRequest{Payload: "KEY-MATERIAL: extra"}, &extra[i])
	}
	before, _ := f.keys.List(context.Background())
	for _, c := range []struct {
		keys   []string
		status int
		code   api.Code
	}{
		{[]string{"6a0e5c7e-1111-4a4a-9b9b-000000000009"}, 409, api.CodeVTPMKeyMissing},
		{[]string{foreign.ID}, 409, api.CodeVTPMKeyMissing}, // as if absent: another project's ids tell nothing
		{[]string{own.ID, extra[0].ID, extra[1].ID}, 409, api.CodeTooManyHyperVKeys},
	} {
		if code := call("POST", "/v1/vtpms", "", "", hypervVTPM(inst, c.keys...), &e); code != c.status || e.Error.Code != c.code || !strings.Contains(e.Error.Message, c.keys[0]) && len(c.keys) == 1 {
			t.Fatalf("keys %v: %d %+v", c.keys, code, e)
		}
	}
	if after, _ := f.keys.List(context.Background()); len(after) != len(before) || f.call(t, "GET", "/v1/vtpms/"+inst, "", nil, nil) != 404 {
		t.Fatal("a refused Hyper-V vTPM left a record or a secret behind")
	}

	var v api.VTPM
	if code := call("POST", "/v1/vtpms", "", "", hypervVTPM(inst, own.ID), &v); code != 202 || v.Host != "hv1" {
		t.Fatalf("Hyper-V vTPM: %d %+v", code, v)
	}
	var plan api.HyperVPlan
	if code := call("GET", "/v1/vtpms/"+inst+"/hyperv/plan?vm_name=instance-0000002a", "p1", "", nil, &plan); code != 200 ||
		plan.Host != "hv1" || plan.VMName != "instance-0000002a" || plan.KeyProtector != "local" ||
		!strings.Contains(plan.Script, "$KeyRefs = @('"+own.ID+"')") || !strings.Contains(plan.Script, "Enable-VMTPM") {
		t.Fatalf("plan: %d %+v", code, plan)
	}
	if code := call("GET", "/v1/vtpms/"+inst+"/hyperv/plan", "p2", "", nil, &e); code != 404 {
		t.Fatalf("another project's plan: %d", code)
	}
	other := "0b0b0b0b-0000-4000-8000-00000000b057"
	var libvirtVTPM api.VTPM
	call("POST", "/v1/vtpms", "", "", create(other, map[string]string{"hw:tpm_version": "2.0"}), &libvirtVTPM)
	// A vTPM's own secret is not a tenant's: not shown, not usable as a key.
	if code := call("GET", "/v1/secrets/"+libvirtVTPM.SecretRef, "p1", "", nil, &e); code != 404 {
		t.Fatalf("a vTPM's own secret through the secrets API: %d", code)
	}
	if code := call("POST", "/v1/vtpms", "", "", hypervVTPM("0c0c0c0c-0000-4000-8000-00000000c0c0", libvirtVTPM.SecretRef), &e); code != 409 || e.Error.Code != api.CodeVTPMKeyMissing {
		t.Fatalf("a vTPM's own secret as os_vtpm_keys: %d %+v", code, e)
	}
	if code := call("GET", "/v1/vtpms/"+other+"/hyperv/plan", "p1", "", nil, &e); code != 409 || e.Error.Code != api.CodeNotHyperV {
		t.Fatalf("plan for a libvirt vTPM: %d %+v", code, e)
	}

	// The host fetches the key with its credential, for its own instance only.
	var cred, otherCred api.HostCredential
	if code := call("POST", "/v1/hosts/hv1/credentials", "p1", "", nil, &e); code != 403 {
		t.Fatalf("a project makes a host credential: %d", code)
	}
	if code := call("POST", "/v1/hosts/nope/credentials", "", "", nil, &e); code != 404 {
		t.Fatalf("credential for an unknown host: %d", code)
	}
	call("POST", "/v1/hosts/hv1/credentials", "", "", nil, &cred)
	call("POST", "/v1/hosts/h1/credentials", "", "", nil, &otherCred)
	payloadPath := "/v1/secrets/" + own.ID + "/payload"
	var got api.SecretPayload
	if code := call("GET", payloadPath, "", cred.Token, nil, &got); code != 200 || got.Payload != signing {
		t.Fatalf("the host fetching its instance's key: %d", code)
	}
	for _, c := range []struct {
		name, path, token string
		status            int
	}{
		{"no credential", payloadPath, "", 401},
		{"a wrong credential", payloadPath, "not-a-host-token", 401},
		{"another host", payloadPath, otherCred.Token, 403},
		{"a key no instance on the host names", "/v1/secrets/" + foreign.ID + "/payload", cred.Token, 403},
	} {
		code := call("GET", c.path, "", c.token, nil, &e)
		if c.token == "" {
			code = call("GET", c.path, "p1", "", nil, &e) // a project's header is no credential
		}
		if code != c.status {
			t.Errorf("%s: %d, want %d", c.name, code, c.status)
		}
	}

	// Deleted since: the plan says which key is gone.
	if err := f.keys.Delete(context.Background(), own.ID); err != nil {
		t.Fatal(err)
	}
	if code := call("GET", "/v1/vtpms/"+inst+"/hyperv/plan", "p1", "", nil, &e); code != 409 || e.Error.Code != api.CodeVTPMKeyMissing {
		t.Fatalf("plan after its key was deleted: %d %+v", code, e)
	}

	// No vtpmd agent runs on a Hyper-V host: the delete completes at once.
	if code := call("DELETE", "/v1/vtpms/"+inst, "p1", "", nil, &v); code != 200 || v.Phase != "deleted" {
		t.Fatalf("deleting the Hyper-V vTPM: %d %+v", code, v)
	}

	for i, b := range bodies {
		if strings.Contains(b, "KEY-MATERIAL") || (strings.Contains(b, signing) && !strings.Contains(b, `"payload"`)) {
			t.Errorf("response %d carries key material: %s", i, b)
		}
	}
	if strings.Contains(logs.String(), "KEY-MATERIAL") || strings.Contains(logs.String(), signing) {
		t.Errorf("the log carries key material:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "secret released to host") {
		t.Error("the release of a key to a host is not logged")
	}
}
