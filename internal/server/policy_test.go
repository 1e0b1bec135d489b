package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/store"
)

// Named policies: created from values or learned, scoped to projects (the
// operator's shared), applied as copies, deleted without touching the
// instances they were applied to; every step in the attestation history.
func TestPolicies(t *testing.T) {
	f := newFixture(t)
	if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil); code != 202 {
		t.Fatalf("create: %d", code)
	}
	// The instance's last accepted evidence: a boot into PCRs 0 and 4.
	log, pcrs := attesttest.EventLog([]attesttest.Measurement{{PCR: 0, Type: 8, Data: []byte("firmware")}, {PCR: 4, Type: 0x80000003, Data: []byte("kernel")}})
	now := time.Now().UTC()
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		return tx.PutAttestation(&store.Attestation{InstanceID: inst, RegisteredAt: now, EvidenceAt: now, Verdict: "pending", PCRs: pcrs, EventLog: log})
	})
	if err != nil {
		t.Fatal(err)
	}
	zero := strings.Repeat("00", 32)
	pcr0 := hex.EncodeToString(pcrs[0])

	var p api.Policy
	if code := f.call(t, "POST", "/v1/policies", "", api.CreatePolicyRequest{Name: "golden", PCRs: map[int]string{0: zero}}, &p); code != 201 || p.Project != "" || p.PCRs[0] != zero {
		t.Fatalf("operator's policy: %d %+v", code, p)
	}
	learnReq := api.CreatePolicyRequest{Name: "learned", LearnFrom: &api.LearnFrom{InstanceID: inst, PCRs: []int{0, 4}}}
	if code := f.call(t, "POST", "/v1/policies", "p1", learnReq, &p); code != 201 || p.Project != "p1" || p.PCRs[0] != pcr0 || p.LearnedFrom != inst || !p.HasEventLog {
		t.Fatalf("learned policy: %d %+v", code, p)
	}

	digestsReq := api.CreatePolicyRequest{Name: "boot-digests", LearnFrom: &api.LearnFrom{InstanceID: inst, Digests: true}}
	p = api.Policy{}
	if code := f.call(t, "POST", "/v1/policies", "", digestsReq, &p); code != 201 || p.Project != "" || len(p.Digests[0]) != 1 || len(p.Digests[4]) != 1 || p.PCRs != nil {
		t.Fatalf("learned digests: %d %+v", code, p)
	}
	allow := api.CreatePolicyRequest{Name: "kernels", Digests: map[int][]string{4: {zero, p.Digests[4][0]}}}
	p = api.Policy{}
	if code := f.call(t, "POST", "/v1/policies", "", allow, &p); code != 201 || len(p.Digests[4]) != 2 {
		t.Fatalf("allowed digests: %d %+v", code, p)
	}
	for _, c := range []struct {
		name, project string
		req           any
		status        int
		code          api.Code
	}{
		{"duplicate", "p1", learnReq, 409, api.CodeAlreadyExists},
		{"bad name", "", api.CreatePolicyRequest{Name: "Golden!", PCRs: map[int]string{0: zero}}, 400, api.CodeInvalidParameter},
		{"short digest", "", api.CreatePolicyRequest{Name: "x", PCRs: map[int]string{0: "00"}}, 400, api.CodeInvalidParameter},
		{"no such PCR", "", api.CreatePolicyRequest{Name: "x", PCRs: map[int]string{24: zero}}, 400, api.CodeInvalidParameter},
		{"values and learning", "", api.CreatePolicyRequest{Name: "x", PCRs: map[int]string{0: zero}, LearnFrom: &api.LearnFrom{InstanceID: inst}}, 400, api.CodeInvalidParameter},
		{"neither", "", api.CreatePolicyRequest{Name: "x"}, 400, api.CodeInvalidParameter},
		{"another project's", "p1", api.CreatePolicyRequest{Name: "x", Project: "p2", PCRs: map[int]string{0: zero}}, 403, api.CodeInvalidProject},
		{"host by a project", "p1", api.CreatePolicyRequest{Name: "x", LearnFrom: &api.LearnFrom{Host: "h1"}}, 403, api.CodeForbidden},
		{"another project's instance", "p2", api.CreatePolicyRequest{Name: "x", LearnFrom: &api.LearnFrom{InstanceID: inst}}, 404, api.CodeNotFound},
		{"host without attestation", "", api.CreatePolicyRequest{Name: "x", LearnFrom: &api.LearnFrom{Host: "h1"}}, 404, api.CodeNotFound},
		{"bad JSON", "", `{"name": 1}`, 400, api.CodeInvalidJSON},
		{"nothing to learn", "p1", api.CreatePolicyRequest{Name: "x", LearnFrom: &api.LearnFrom{InstanceID: inst, PCRs: []int{15}}}, 400, api.CodeInvalidParameter},
		{"empty digest list", "", api.CreatePolicyRequest{Name: "x", Digests: map[int][]string{4: {}}}, 400, api.CodeInvalidParameter},
		{"short allowed digest", "", api.CreatePolicyRequest{Name: "x", Digests: map[int][]string{4: {"ab"}}}, 400, api.CodeInvalidParameter},
	} {
		var e api.ErrorBody
		if got := f.call(t, "POST", "/v1/policies", c.project, c.req, &e); got != c.status || e.Error.Code != c.code {
			t.Errorf("%s: %d %q, want %d %q", c.name, got, e.Error.Code, c.status, c.code)
		}
	}

	names := func(project string) (out []string) {
		var l api.PolicyList
		f.call(t, "GET", "/v1/policies", project, nil, &l)
		for _, p := range l.Items {
			out = append(out, p.Project+"/"+p.Name)
		}
		return out
	}
	for project, want := range map[string][]string{"": {"/boot-digests", "/golden", "/kernels", "p1/learned"},
		"p1": {"/boot-digests", "/golden", "/kernels", "p1/learned"}, "p2": {"/boot-digests", "/golden", "/kernels"}} {
		if got := names(project); !slices.Equal(got, want) {
			t.Errorf("%q lists %v, want %v", project, got, want)
		}
	}
	if code := f.call(t, "GET", "/v1/policies/learned", "p2", nil, nil); code != 404 {
		t.Fatalf("p2 reads p1's policy: %d", code)
	}
	if code := f.call(t, "GET", "/v1/policies/learned?project=p1", "", nil, &p); code != 200 || p.Name != "learned" {
		t.Fatalf("operator reads p1's policy: %d %+v", code, p)
	}

	// Applying: the shared policy does not fit this boot, the learned one does.
	base := "/v1/vtpms/" + inst + "/attestation"
	var a api.Attestation
	if code := f.call(t, "POST", base+"/policy", "p1", api.PolicyRequest{Policy: "golden"}, &a); code != 200 || a.Verdict != "untrusted" || a.Policy != "golden" || !strings.Contains(a.Reasons[0], "PCR 0") {
		t.Fatalf("apply golden: %d %+v", code, a)
	}
	a = api.Attestation{}
	if code := f.call(t, "POST", base+"/policy", "p1", api.PolicyRequest{Policy: "kernels"}, &a); code != 200 || a.Verdict != "trusted" || !slices.Equal(a.PolicyPCRs, []int{4}) {
		t.Fatalf("apply allowed kernels: %d %+v", code, a)
	}
	a = api.Attestation{}
	if code := f.call(t, "POST", base+"/policy", "p1", api.PolicyRequest{Policy: "learned"}, &a); code != 200 || a.Verdict != "trusted" || !slices.Equal(a.PolicyPCRs, []int{0, 4}) {
		t.Fatalf("apply learned: %d %+v", code, a)
	}
	for _, c := range []struct {
		req  api.PolicyRequest
		code api.Code
	}{
		{api.PolicyRequest{Policy: "nope"}, api.CodeNotFound},
		{api.PolicyRequest{Policy: "golden", Learn: true}, api.CodeInvalidParameter},
	} {
		var e api.ErrorBody
		if f.call(t, "POST", base+"/policy", "p1", c.req, &e); e.Error.Code != c.code {
			t.Errorf("apply %+v: %q, want %q", c.req, e.Error.Code, c.code)
		}
	}

	// Deleting: a project cannot delete the operator's; its own goes, and
	// the instance keeps its copy.
	if code := f.call(t, "DELETE", "/v1/policies/golden", "p1", nil, nil); code != 403 {
		t.Fatalf("p1 deletes the shared policy: %d", code)
	}
	if code := f.call(t, "DELETE", "/v1/policies/learned", "p1", nil, nil); code != 204 {
		t.Fatalf("delete: %d", code)
	}
	if code := f.call(t, "DELETE", "/v1/policies/learned", "p1", nil, nil); code != 404 {
		t.Fatalf("delete twice: %d", code)
	}
	a = api.Attestation{}
	if f.call(t, "GET", base, "p1", nil, &a); a.Verdict != "trusted" || a.Policy != "learned" || len(a.PolicyPCRs) != 2 {
		t.Fatalf("after the policy's deletion: %+v", a)
	}

	var h api.EventList
	if code := f.call(t, "GET", base+"/history", "p1", nil, &h); code != 200 {
		t.Fatalf("history: %d", code)
	}
	var actions []string
	for _, e := range h.Items {
		actions = append(actions, e.Action)
	}
	if want := []string{"policy golden applied", "attestation untrusted", "policy kernels applied", "attestation trusted", "policy learned applied"}; !slices.Equal(actions, want) {
		t.Fatalf("history %v, want %v", actions, want)
	}
	if code := f.call(t, "GET", base+"/history", "p2", nil, nil); code != 404 {
		t.Fatalf("p2 reads p1's history: %d", code)
	}
}

// An agent's long poll returns as soon as fresh evidence is asked for, or
// at once if it was asked before; without a request it times out.
func TestRefresh(t *testing.T) {
	f := newFixture(t)
	if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil); code != 202 {
		t.Fatalf("create: %d", code)
	}
	base := "/v1/vtpms/" + inst + "/attestation/refresh"
	var e api.ErrorBody
	if code := f.call(t, "POST", base, "p1", nil, &e); code != 409 || e.Error.Code != api.CodeNotRegistered {
		t.Fatalf("refresh before registration: %d %+v", code, e)
	}
	now := time.Now().UTC()
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		tokenHash := sha256.Sum256([]byte("agent-token"))
		return tx.PutAttestation(&store.Attestation{InstanceID: inst, RegisteredAt: now, Verdict: "pending", AgentTokenHash: tokenHash[:]})
	})
	if err != nil {
		t.Fatal(err)
	}
	var r api.Refresh
	f.token = "not-the-agent"
	if code := f.call(t, "GET", base+"?wait=50ms", "", nil, &e); code != 401 || e.Error.Code != api.CodeUnauthenticated {
		t.Fatalf("long poll without the agent's token: %d %+v", code, e)
	}
	f.token = "agent-token"
	if code := f.call(t, "GET", base+"?wait=50ms", "", nil, &r); code != 200 || r.Requested {
		t.Fatalf("long poll without a request: %d %+v", code, r)
	}
	for _, wait := range []string{"6m", "-1s", "soon"} {
		if code := f.call(t, "GET", base+"?wait="+wait, "", nil, &e); code != 400 || e.Error.Code != api.CodeInvalidParameter {
			t.Errorf("wait=%s: %d %+v", wait, code, e)
		}
	}

	got := make(chan api.Refresh)
	go func() { // no t.Fatal off the test's goroutine
		var r api.Refresh
		req, _ := http.NewRequest("GET", f.url+base+"?wait=60", nil)
		req.Header.Set("Authorization", "Bearer agent-token")
		if resp, err := f.http.Do(req); err == nil {
			json.NewDecoder(resp.Body).Decode(&r)
			resp.Body.Close()
		}
		got <- r
	}()
	time.Sleep(100 * time.Millisecond) // let the poll start waiting; it works either way
	var asked api.Refresh
	if code := f.call(t, "POST", base, "p1", nil, &asked); code != 202 || !asked.Requested {
		t.Fatalf("refresh: %d %+v", code, asked)
	}
	if r := <-got; !r.Requested || !r.RequestedAt.Equal(asked.RequestedAt) {
		t.Fatalf("the waiting agent got %+v, want the request of %s", r, asked.RequestedAt)
	}
	// Asked while no agent waits: the next poll collects it, once.
	f.call(t, "POST", base, "", nil, &asked)
	for i, want := range []bool{true, false} {
		if f.call(t, "GET", base+"?wait=10ms", "", nil, &r); r.Requested != want {
			t.Fatalf("poll %d after an earlier request: %+v", i, r)
		}
	}
	if code := f.call(t, "POST", base, "p2", nil, &e); code != 404 {
		t.Fatalf("another project asks: %d", code)
	}
}
