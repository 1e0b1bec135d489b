package server

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
)

// manufactured records vTPM id as its agent would once it made the TPM:
// active, with an EK.
func (f *fixture) manufactured(t *testing.T, id string) {
	t.Helper()
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		v, err := tx.GetVTPM(id)
		if err != nil {
			return err
		}
		v.Phase, v.EKs = store.PhaseActive, []store.EK{{Kind: "rsa2048", Handle: 0x81010001, PublicDER: []byte{1}}}
		return tx.UpdateVTPM(v)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func resize(specs map[string]string) api.ResizeRequest {
	return api.ResizeRequest{ResolveRequest: api.ResolveRequest{FlavorSpecs: specs}}
}

// TestResizeRefusals: every refusal of resize, confirm and revert, with
// its status and code, and nothing changed by any.
func TestResizeRefusals(t *testing.T) {
	f := newFixture(t)
	v20 := map[string]string{"hw:tpm_version": "2.0"}
	f.call(t, "POST", "/v1/vtpms", "", create(inst, v20), nil)
	other := "11111111-2222-4333-8444-555555555555"

	refuse := func(t *testing.T, path string, body any, project string, status int, code api.Code) {
		t.Helper()
		var e api.ErrorBody
		if got := f.call(t, "POST", path, project, body, &e); got != status || e.Error.Code != code || e.Error.Message == "" {
			t.Fatalf("POST %s: %d %+v; want %d %s", path, got, e.Error, status, code)
		}
	}
	refuse(t, "/v1/vtpms/"+inst+"/resize", resize(v20), "", 409, api.CodeInvalidPhase) // pending: not made yet
	f.manufactured(t, inst)
	var before api.VTPM
	f.call(t, "GET", "/v1/vtpms/"+inst, "", nil, &before)

	for _, c := range []struct {
		name    string
		path    string
		body    any
		project string
		status  int
		code    api.Code
	}{
		{"refused flavor", inst + "/resize", resize(map[string]string{"hw:tpm_version": "3"}), "", 400, api.CodeInvalidTPMVersion},
		{"to deployment", inst + "/resize", resize(map[string]string{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "deployment"}), "", 400, api.CodeSecretSecurityChangeNotSupported},
		{"to Hyper-V", inst + "/resize", resize(nil), "", 400, api.CodeInvalidHypervisorType},
		{"host lacks 1.2", inst + "/resize", resize(map[string]string{"hw:tpm_version": "1.2"}), "", 409, api.CodeResizeNeedsMigration},
		{"another project's", inst + "/resize", resize(v20), "p2", 404, api.CodeNotFound},
		{"no vTPM either side", other + "/resize", resize(nil), "", 400, api.CodeNoVTPMRequested},
		{"first vTPM on an unknown host", other + "/resize", api.ResizeRequest{Project: "p1", Host: "nowhere", ResolveRequest: api.ResolveRequest{FlavorSpecs: v20}}, "", 404, api.CodeNotFound},
		{"first vTPM on a host without 1.2", other + "/resize", api.ResizeRequest{Project: "p1", Host: "h1", ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "1.2"}}}, "", 409, api.CodeNoValidHost},
		{"not a uuid", "nope/resize", resize(v20), "", 400, api.CodeInvalidInstanceID},
		{"confirm with none pending", inst + "/resize/confirm", nil, "", 409, api.CodeNoResizePending},
		{"revert with none pending", inst + "/resize/revert", nil, "", 409, api.CodeNoResizePending},
		{"confirm of no vTPM", other + "/resize/confirm", nil, "", 404, api.CodeNotFound},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.name == "to Hyper-V" {
				c.body = api.ResizeRequest{ResolveRequest: api.ResolveRequest{ImageProps: map[string]string{"hypervisor_type": "hyperv",
					"hw_machine_type": "hyperv-gen2", "os_vtpm": "required"}}}
				c.code, c.status = api.CodeResizeNotSupported, 400
			}
			refuse(t, "/v1/vtpms/"+c.path, c.body, c.project, c.status, c.code)
		})
	}
	var after api.VTPM
	f.call(t, "GET", "/v1/vtpms/"+inst, "", nil, &after)
	if after.UpdatedAt != before.UpdatedAt || after.Resize != nil {
		t.Fatalf("a refusal changed the vTPM: %+v", after)
	}
	var list api.VTPMList
	if f.call(t, "GET", "/v1/vtpms", "", nil, &list); len(list.Items) != 1 {
		t.Fatalf("a refusal made a vTPM: %d records", len(list.Items))
	}

	// A resize to a new TPM: a second one, and a confirm before the agent
	// made the new TPM, are refused; revert is not.
	var v api.VTPM
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/resize", "", resize(map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}), &v); code != 202 ||
		v.Resize == nil || v.Resize.Kind != "new_tpm" || v.Resize.OldSecretRef != before.SecretRef || v.SecretRef == before.SecretRef || v.Phase != "pending" {
		t.Fatalf("resize to a new TPM: %d %+v", code, v)
	}
	newSecret := v.SecretRef
	refuse(t, "/v1/vtpms/"+inst+"/resize", resize(v20), "", 409, api.CodeResizePending)
	refuse(t, "/v1/vtpms/"+inst+"/resize/confirm", nil, "", 409, api.CodeResizeInProgress)
	v = api.VTPM{}
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/resize/revert", "", nil, &v); code != 202 || v.Resize == nil || v.Resize.Status != "reverting" ||
		v.SecretRef != before.SecretRef || *v.Spec.Model != "tpm-tis" {
		t.Fatalf("revert: %d %+v", code, v)
	}
	refuse(t, "/v1/vtpms/"+inst+"/resize/revert", nil, "", 409, api.CodeResizeInProgress)
	refuse(t, "/v1/vtpms/"+inst+"/resize/confirm", nil, "", 409, api.CodeResizeInProgress)
	// The revert shredded the new TPM's secret, never the old one's.
	if _, err := f.keys.Get(context.Background(), newSecret); !errors.Is(err, keyring.ErrNotFound) {
		t.Fatalf("the new TPM's secret after revert: %v", err)
	}
	if _, err := f.keys.Get(context.Background(), before.SecretRef); err != nil {
		t.Fatalf("the old TPM's secret after revert: %v", err)
	}
	var evs api.EventList
	f.call(t, "GET", "/v1/vtpms/"+inst+"/events", "", nil, &evs)
	var actions []string
	for _, e := range evs.Items {
		actions = append(actions, e.Action)
	}
	if n := len(actions); n < 2 || actions[n-2] != "resize requested" || actions[n-1] != "resize reverted" {
		t.Fatalf("events: %v", actions)
	}
}

// TestResizeToNewTPMNeedsResizer: a host whose backend cannot keep an old
// TPM beside a new one (Xen's) refuses a resize to another model, and
// keeps the state for one that changes neither version nor model; a
// libvirt host takes a resize to another model.
func TestResizeToNewTPMNeedsResizer(t *testing.T) {
	f := newFixture(t)
	const other = "7d7a0c4e-8f4b-4bd2-9d6e-2b8f4f3c1a11"
	caps := spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V20}, Models: []spec.Model{spec.TIS, spec.CRB}}
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		if err := tx.PutHost(&store.Host{Name: "xen", Traits: spec.HostTraits(caps).List(), Capacity: 2, Backend: "xen"}); err != nil {
			return err
		}
		if err := tx.PutHost(&store.Host{Name: "lv", Traits: spec.HostTraits(caps).List(), Capacity: 2, Backend: "libvirt"}); err != nil {
			return err
		}
		for id, host := range map[string]string{inst: "xen", other: "lv"} {
			err := tx.CreateVTPM(&store.VTPM{InstanceID: id, Project: "p1", Host: host, Spec: spec.Spec{Version: spec.V20, Model: spec.TIS, SecretSecurity: spec.User},
				Desired: store.DesiredRunning, Phase: store.PhaseActive, EKs: []store.EK{{Kind: "rsa2048", PublicDER: []byte{1}}}})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var e api.ErrorBody
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/resize", "", resize(map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}), &e); code != 409 || e.Error.Code != api.CodeNotSupported {
		t.Fatalf("new TPM on Xen: %d %+v", code, e)
	}
	var v api.VTPM
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/resize", "", resize(map[string]string{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host"}), &v); code != 202 ||
		v.Resize == nil || v.Resize.Kind != "keep" || v.Spec.SecretSecurity != "host" || v.Phase != "active" {
		t.Fatalf("keep on Xen: %d %+v", code, v)
	}
	var reverted api.VTPM
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/resize/revert", "", nil, &reverted); code != 202 || reverted.Resize != nil || reverted.Spec.SecretSecurity != "user" {
		t.Fatalf("revert of keep: %d %+v", code, reverted)
	}
	if code := f.call(t, "POST", "/v1/vtpms/"+other+"/resize", "", resize(map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}), &v); code != 202 ||
		v.Resize == nil || v.Resize.Kind != "new_tpm" || v.Phase != "pending" {
		t.Fatalf("new TPM on libvirt: %d %+v", code, v)
	}
}

// TestAgentResized: over the agent protocol, a resize to a new TPM asks
// the vTPM's agent to set the old TPM aside (no EKs, a new secret), a
// revert to restore it (the old EKs and secret back), and only the agent
// of the vTPM's host, at the generation it read, ends the resize.
func TestAgentResized(t *testing.T) {
	w := newAgentHosts(t)
	v0 := w.create(t, onA, crb, "ha")
	cur := w.read(t, w.a, onA)
	ek := api.AgentEK{Kind: "ecc", Handle: 0x81010002, Public: publicDER(t, p256(t))}
	if code := w.do(t, w.a, "PUT", "/v1/agent/vtpms/"+onA, api.AgentReport{Incarnation: cur.Incarnation, Generation: cur.Generation,
		Phase: "active", EKs: []api.AgentEK{ek}, Event: api.AgentEvent{Action: "started"}}, nil); code != 200 {
		t.Fatalf("report: %d", code)
	}
	// ha serves TIS too from now on, so a resize to it stays there.
	caps := spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V20}, Models: []spec.Model{spec.CRB, spec.TIS}}
	if code := w.do(t, w.a, "PUT", "/v1/agent/host", api.AgentHost{Traits: spec.HostTraits(caps).List(), Capacity: 4, Backend: "swtpm", Version: "test"}, nil); code != 204 {
		t.Fatalf("re-registering ha: %d", code)
	}
	var v api.VTPM
	if code := w.call(t, "POST", "/v1/vtpms/"+onA+"/resize", "", resize(map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": tis}), &v); code != 202 || v.Resize == nil || v.Resize.Kind != "new_tpm" {
		t.Fatalf("resize: %d %+v", code, v)
	}
	got := w.read(t, w.a, onA)
	if got.Resize != "set_aside" || len(got.EKs) != 0 || got.SecretRef == v0.SecretRef || got.Phase != "pending" {
		t.Fatalf("the agent's record of a resize to a new TPM: %+v", got)
	}
	var e api.ErrorBody
	resized := func(host *http.Client, generation int64) int {
		e = api.ErrorBody{}
		return w.do(t, host, "POST", "/v1/agent/vtpms/"+onA+"/resized", api.AgentResized{Incarnation: got.Incarnation, Generation: generation,
			Event: api.AgentEvent{Action: "old TPM restored"}}, &e)
	}
	refused(t, "resized while the resize is pending", resized(w.a, got.Generation), e, 409, api.CodeConflict)

	if code := w.call(t, "POST", "/v1/vtpms/"+onA+"/resize/revert", "", nil, nil); code != 202 {
		t.Fatalf("revert: %d", code)
	}
	got = w.read(t, w.a, onA)
	if got.Resize != "restore" || got.SecretRef != v0.SecretRef || len(got.EKs) != 1 || !bytes.Equal(got.EKs[0].Public, ek.Public) || *got.Spec.Model != crb {
		t.Fatalf("the agent's record of a reverted resize: %+v", got)
	}
	refused(t, "resized by another host's agent", resized(w.b, got.Generation), e, 403, api.CodeForbidden)
	refused(t, "resized at a stale generation", resized(w.a, got.Generation-1), e, 409, api.CodeConflict)
	var wr api.AgentWritten
	if code := w.do(t, w.a, "POST", "/v1/agent/vtpms/"+onA+"/resized", api.AgentResized{Incarnation: got.Incarnation, Generation: got.Generation,
		Event: api.AgentEvent{Action: "old TPM restored"}}, &wr); code != 200 || wr.Generation <= got.Generation {
		t.Fatalf("resized: %d %+v", code, wr)
	}
	if got = w.read(t, w.a, onA); got.Resize != "" {
		t.Fatalf("the agent's record after the resize ended: %+v", got)
	}
	if _, op := w.operatorView(t, onA); op.Resize != nil || op.SecretRef != v0.SecretRef {
		t.Fatalf("the operator's view after the resize ended: %+v", op)
	}
}
