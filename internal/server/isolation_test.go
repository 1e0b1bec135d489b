package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// createFor is the operator creating a TPM 2.0 vTPM for project's instance id.
func createFor(id, project string) api.CreateVTPMRequest {
	return api.CreateVTPMRequest{InstanceID: id, Project: project, ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}}
}

// A vTPM's history belongs to that vTPM, not to its instance id: after
// p2's vTPM is deleted, p1's new vTPM of the same instance id shows none of
// p2's events, attestation history or attestation record, and a late write
// of p2's attestation cannot land in p1's. The operator still reads p2's
// audit trail with ?all.
func TestReusedInstanceIDStartsClean(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	if code := f.call(t, "POST", "/v1/vtpms", "", createFor(inst, "p2"), nil); code != 202 {
		t.Fatalf("p2's create: %d", code)
	}
	// p2's vTPM attests and gets a policy: its history names p2's people
	// and reasons.
	log, pcrs := attesttest.EventLog([]attesttest.Measurement{{PCR: 0, Type: 8, Data: []byte("firmware")}})
	now := time.Now().UTC()
	err := f.store.Update(ctx, func(tx *store.Tx) error {
		return tx.PutAttestation(&store.Attestation{InstanceID: inst, RegisteredAt: now, EvidenceAt: now, PCRs: pcrs, EventLog: log,
			Verdict: "untrusted", Reasons: []string{"p2's private reason"}})
	})
	if err != nil {
		t.Fatal(err)
	}
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/attestation/policy", "p2", api.PolicyRequest{Learn: true}, nil); code != 200 {
		t.Fatalf("p2's policy: %d", code)
	}
	var hist api.EventList
	if f.call(t, "GET", "/v1/vtpms/"+inst+"/attestation/history", "p2", nil, &hist); len(hist.Items) == 0 {
		t.Fatal("p2's attestation history is empty")
	}
	var old *store.VTPM
	if err := f.store.View(ctx, func(tx *store.Tx) (err error) { old, err = tx.GetVTPM(inst); return err }); err != nil {
		t.Fatal(err)
	}
	p2Subject, err := f.api.Verifier.Instance(ctx, tenant.Caller{Project: "p2", Actor: "api:project:p2"}, inst)
	if err != nil {
		t.Fatal(err)
	}
	if code := f.call(t, "DELETE", "/v1/vtpms/"+inst, "p2", nil, nil); code != 200 {
		t.Fatalf("p2's delete: %d", code)
	}
	// The delete took p2's attestation record with the vTPM (a write that
	// races it checks the vTPM in its own transaction, below; records an
	// older vtpmd left behind went with migration 17): nothing is left
	// for the next vTPM to inherit.
	err = f.store.View(ctx, func(tx *store.Tx) error { _, err := tx.GetAttestation(inst); return err })
	if !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("p2's attestation after its delete: %v, want none", err)
	}

	if code := f.call(t, "POST", "/v1/vtpms", "", createFor(inst, "p1"), nil); code != 202 {
		t.Fatalf("p1's create: %d", code)
	}
	var evs api.EventList
	f.call(t, "GET", "/v1/vtpms/"+inst+"/events", "p1", nil, &evs)
	if len(evs.Items) != 1 || evs.Items[0].Action != "created" {
		t.Errorf("p1's events: %+v, want only its create", evs.Items)
	}
	hist = api.EventList{}
	if f.call(t, "GET", "/v1/vtpms/"+inst+"/attestation/history", "p1", nil, &hist); len(hist.Items) != 0 {
		t.Errorf("p1's attestation history: %+v, want none", hist.Items)
	}
	var e api.ErrorBody
	if code := f.call(t, "GET", "/v1/vtpms/"+inst+"/attestation", "p1", nil, &e); code != 404 || e.Error.Code != api.CodeNotRegistered {
		t.Errorf("p1's attestation: %d %+v, want 404 %s", code, e, api.CodeNotRegistered)
	}

	// p2's request, which read p2's vTPM before the delete, writes only
	// after p1's create: refused, and nothing of it stays.
	if _, err := f.api.Verifier.SetPolicy(ctx, p2Subject, api.PolicyRequest{Learn: true}); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("a write to the deleted vTPM's attestation: %v, want not found", err)
	}
	if code := f.call(t, "GET", "/v1/vtpms/"+inst+"/attestation", "p1", nil, &e); code != 404 {
		t.Errorf("p1's attestation after p2's late write: %d", code)
	}
	evs = api.EventList{}
	if f.call(t, "GET", "/v1/vtpms/"+inst+"/events", "p1", nil, &evs); len(evs.Items) != 1 {
		t.Errorf("p1's events after p2's late write: %+v", evs.Items)
	}

	// The operator's audit trail keeps both vTPMs, told apart.
	var all api.EventList
	if code := f.call(t, "GET", "/v1/vtpms/"+inst+"/events?all=true", "", nil, &all); code != 200 {
		t.Fatalf("operator's ?all: %d", code)
	}
	var actions []string
	incarnations := map[string]bool{}
	for _, e := range all.Items {
		actions = append(actions, e.Action)
		incarnations[e.Incarnation] = true
	}
	if !slices.Contains(actions, "policy learned") || !slices.Contains(actions, "deleted") || len(incarnations) != 2 || incarnations[""] {
		t.Errorf("operator's audit trail: %+v", all.Items)
	}
	var v api.VTPM
	if f.call(t, "GET", "/v1/vtpms/"+inst, "p1", nil, &v); v.Incarnation == "" || v.Incarnation != evs.Items[0].Incarnation || v.Incarnation == old.Incarnation {
		t.Errorf("p1's vTPM is incarnation %q, its event %q, p2's was %q", v.Incarnation, evs.Items[0].Incarnation, old.Incarnation)
	}
	if code := f.call(t, "GET", "/v1/vtpms/"+inst+"/events?all=true", "p1", nil, &e); code != 403 || e.Error.Code != api.CodeForbidden {
		t.Errorf("a project's ?all: %d %+v", code, e)
	}
	if code := f.call(t, "GET", "/v1/vtpms/"+inst+"/events?all=maybe", "", nil, &e); code != 400 || e.Error.Code != api.CodeInvalidParameter {
		t.Errorf("?all=maybe: %d %+v", code, e)
	}
	// A deleted instance id's trail stays the operator's to read.
	if code := f.call(t, "DELETE", "/v1/vtpms/"+inst, "", nil, nil); code != 200 {
		t.Fatalf("p1's delete: %d", code)
	}
	all = api.EventList{}
	if code := f.call(t, "GET", "/v1/vtpms/"+inst+"/events?all=true", "", nil, &all); code != 200 || len(all.Items) < 5 {
		t.Errorf("operator's ?all of a deleted instance id: %d %+v", code, all.Items)
	}
	if code := f.call(t, "GET", "/v1/vtpms/"+inst+"/events", "", nil, &e); code != 404 {
		t.Errorf("events of a deleted instance id without ?all: %d", code)
	}
}

// world is a fixture where project p1 has a vTPM (mine), a Hyper-V host
// can take p1's Hyper-V vTPMs, and, with others, project p2 has a vTPM
// (theirs) that attests, a stored secret and a policy.
type world struct {
	*fixture
	p2Secret string
}

const (
	mine     = "a1a1a1a1-0000-4000-8000-000000000001"
	theirs   = "b2b2b2b2-0000-4000-8000-000000000002"
	p2Policy = "p2-golden"
)

// newWorld makes a world, with p2's objects when others is set; p2's
// secret gets a fresh id, so a world without them remembers secretID as
// the id it would have had.
func newWorld(t *testing.T, others bool, secretID string) *world {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	signer, err := attest.NewSigner(key)
	if err != nil {
		t.Fatal(err)
	}
	f := newFixtureWith(t, setup{signer: signer})
	caps := spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V20}, HyperVGen2: true}
	err = f.store.Update(context.Background(), func(tx *store.Tx) error {
		return tx.PutHost(&store.Host{Name: "hv1", Traits: spec.HostTraits(caps).List(), Capacity: 10, Backend: "hyperv"})
	})
	if err != nil {
		t.Fatal(err)
	}
	if code := f.call(t, "POST", "/v1/vtpms", "", createFor(mine, "p1"), nil); code != 202 {
		t.Fatalf("p1's create: %d", code)
	}
	w := &world{fixture: f, p2Secret: secretID}
	if !others {
		return w
	}
	if code := f.call(t, "POST", "/v1/vtpms", "", createFor(theirs, "p2"), nil); code != 202 {
		t.Fatalf("p2's create: %d", code)
	}
	f.trusted(t, theirs)
	var sec api.Secret
	if code := f.call(t, "POST", "/v1/secrets", "p2", api.CreateSecretRequest{Payload: "p2's key"}, &sec); code != 201 {
		t.Fatalf("p2's secret: %d", code)
	}
	w.p2Secret = sec.ID
	if code := f.call(t, "POST", "/v1/policies", "p2", api.CreatePolicyRequest{Name: p2Policy, PCRs: map[int]string{0: strings.Repeat("00", 32)}}, nil); code != 201 {
		t.Fatalf("p2's policy: %d", code)
	}
	return w
}

// Another project's instance ids, secret ids and policy names answer
// exactly as absent ones do: the same request gets the same status and
// body, byte for byte, whether p2's object exists or not.
func TestAnotherProjectsIDsReadAsAbsent(t *testing.T) {
	withP2 := newWorld(t, true, "")
	without := newWorld(t, false, withP2.p2Secret)

	type request struct {
		method, path, project string
		body                  any
	}
	var reqs []request
	for _, r := range withP2.api.routes() {
		method, path, _ := strings.Cut(r.pattern, " ")
		if r.access == agents || !strings.HasPrefix(path, "/v1/vtpms/{id}") {
			continue
		}
		var body any
		switch {
		case strings.HasSuffix(path, "/attach"):
			body = api.AttachRequest{Domain: "guest1"}
		case strings.HasSuffix(path, "/attestation/policy"):
			body = api.PolicyRequest{Learn: true}
		}
		reqs = append(reqs, request{method, strings.Replace(path, "{id}", theirs, 1), "p1", body})
	}
	reqs = append(reqs,
		request{"GET", "/v1/vtpms/" + theirs + "/events?all=true", "p1", nil},
		request{"POST", "/v1/vtpms/" + mine + "/attestation/policy", "p1", api.PolicyRequest{Policy: p2Policy}},
		request{"GET", "/v1/policies/" + p2Policy, "p1", nil},
		request{"DELETE", "/v1/policies/" + p2Policy, "p1", nil},
		request{"POST", "/v1/policies", "p1", api.CreatePolicyRequest{Name: "x", LearnFrom: &api.LearnFrom{InstanceID: theirs}}},
		request{"GET", "/v1/secrets/" + withP2.p2Secret, "p1", nil},
		request{"GET", "/v1/vtpms?after=" + theirs, "p1", nil},
		// The operator creating p1's Hyper-V vTPM with p2's key.
		request{"POST", "/v1/vtpms", "", api.CreateVTPMRequest{InstanceID: "c3c3c3c3-0000-4000-8000-000000000003", Project: "p1",
			ResolveRequest: api.ResolveRequest{ImageProps: map[string]string{"hypervisor_type": "hyperv", "hw_machine_type": "hyperv-gen2",
				"os_vtpm": "required", "os_vtpm_keys": withP2.p2Secret}}}},
		// Last, as it may make something: a project naming p2's instance.
		request{"POST", "/v1/vtpms", "p1", createFor(theirs, "p1")},
	)
	for _, r := range reqs {
		var a, b []byte
		codeA := withP2.call(t, r.method, r.path, r.project, r.body, &a)
		codeB := without.call(t, r.method, r.path, r.project, r.body, &b)
		if codeA != codeB || string(a) != string(b) {
			t.Errorf("%s %s as %q: with p2's object %d %s; without %d %s", r.method, r.path, r.project, codeA, a, codeB, b)
		}
		if codeA < 400 && !strings.HasPrefix(r.path, "/v1/vtpms?") {
			t.Errorf("%s %s as %q succeeded: %d %s", r.method, r.path, r.project, codeA, a)
		}
	}
	// p2's objects are untouched.
	var v api.VTPM
	if code := withP2.call(t, "GET", "/v1/vtpms/"+theirs, "p2", nil, &v); code != 200 || v.Desired != "running" || v.Domain != "" {
		t.Errorf("p2's vTPM: %d %+v", code, v)
	}
	if code := withP2.call(t, "GET", "/v1/policies/"+p2Policy, "p2", nil, nil); code != 200 {
		t.Errorf("p2's policy: %d", code)
	}
}

// Creating vTPMs and reading hosts are the operator's: a project (or the
// operator scoped to one) is refused, with a message that says why.
func TestOperatorOnlyRoutes(t *testing.T) {
	f := newFixture(t)
	for _, c := range []struct {
		method, path string
		body         any
		says         string
	}{
		{"POST", "/v1/vtpms", createFor(inst, "p1"), "created by the cloud"},
		{"POST", "/v1/vtpms", create(inst, map[string]string{"hw:tpm_version": "2.0"}), "created by the cloud"},
		{"GET", "/v1/hosts", nil, "vTPM record"},
		{"GET", "/v1/hosts/h1", nil, "vTPM record"},
		{"GET", "/v1/hosts/nope", nil, "vTPM record"},
	} {
		var e api.ErrorBody
		if code := f.call(t, c.method, c.path, "p1", c.body, &e); code != 403 || e.Error.Code != api.CodeForbidden || !strings.Contains(e.Error.Message, c.says) {
			t.Errorf("%s %s as a project: %d %+v", c.method, c.path, code, e)
		}
	}
	if code := f.call(t, "GET", "/v1/vtpms/"+inst, "", nil, nil); code != 404 {
		t.Errorf("a refused create made the vTPM: %d", code)
	}
	var hosts api.HostList
	if code := f.call(t, "GET", "/v1/hosts", "", nil, &hosts); code != 200 || len(hosts.Items) != 1 {
		t.Errorf("the operator's hosts: %d %+v", code, hosts)
	}
	var v api.VTPM
	if code := f.call(t, "POST", "/v1/vtpms", "", createFor(inst, "p1"), &v); code != 202 || v.Project != "p1" {
		t.Fatalf("the operator's create: %d %+v", code, v)
	}
	if code := f.call(t, "GET", "/v1/vtpms/"+inst, "p1", nil, &v); code != 200 || v.Host != "h1" {
		t.Errorf("the project's vTPM names its host: %d %+v", code, v)
	}
}

// Routes that take no body refuse one, before they change anything: the
// operator's and tenants' on the operator's socket, hosts' with the
// certificate of the host the vTPM is placed on (without one they answer
// 401 first).
func TestBodylessRoutesRefuseBodies(t *testing.T) {
	m := newMTLS(t)
	if code := m.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil); code != 202 {
		t.Fatalf("create: %d", code)
	}
	host := m.client(m.enrol(t, "h1"))
	takeBodies := []string{
		"POST /v1/resolve", "POST /v1/vtpms", "POST /v1/vtpms/{id}/attach",
		"POST /v1/vtpms/{id}/attestation/register", "POST /v1/vtpms/{id}/attestation/activate",
		"POST /v1/vtpms/{id}/attestation/evidence", "POST /v1/vtpms/{id}/attestation/policy",
		"POST /v1/secrets", "POST /v1/policies", "POST /v1/broker/secrets",
		"POST /v1/hosts/{name}/attestation/register", "POST /v1/hosts/{name}/attestation/activate",
		"POST /v1/hosts/{name}/attestation/evidence", "POST /v1/hosts/{name}/attestation/policy",
		"POST /v1/agent/enroll", "POST /v1/agent/heartbeat",
		"PUT /v1/agent/host", "PUT /v1/agent/vtpms/{id}", "POST /v1/agent/vtpms/{id}/deleted", "PUT /v1/agent/drift", "POST /v1/agent/renew",
		"POST /v1/agent/vtpms/{id}/rekey", "POST /v1/agent/ek-certificates", "POST /v1/agent/vtpms/{id}/resized",
		"POST /v1/vtpms/{id}/resize",
		"POST /v1/vtpms/{id}/adopt", "PUT /v1/agent/adoptions/{id}",
		"POST /v1/vtpms/{id}/backups/restore", "POST /v1/vtpms/{id}/migrate", "POST /v1/vtpms/{id}/live-migrate", "PUT /v1/agent/transfers/{id}",
		"POST /v1/vtpms/{id}/unshelve", "POST /v1/hosts/{name}/evacuate", "POST /v1/hosts/{name}/evacuate-live",
	}
	var evsBefore api.EventList
	m.call(t, "GET", "/v1/vtpms/"+inst+"/events", "", nil, &evsBefore)
	for _, r := range m.api.routes() {
		if slices.Contains(takeBodies, r.pattern) {
			continue
		}
		method, path, _ := strings.Cut(r.pattern, " ")
		path = strings.NewReplacer("{id}", inst, "{name}", "h1").Replace(path)
		if (strings.HasSuffix(path, "/refresh") || path == "/v1/agent/vtpms") && method == "GET" {
			path += "?wait=0s"
		}
		var e api.ErrorBody
		var code int
		if r.access == hosts {
			code = m.do(t, host, method, path, `{}`, &e)
		} else {
			code = m.call(t, method, path, "", `{}`, &e)
		}
		if code != 400 || e.Error.Code != api.CodeInvalidJSON || e.Error.Message != "This endpoint takes no request body." {
			t.Errorf("%s with a body: %d %+v", r.pattern, code, e)
		}
	}
	// Nothing changed: the vTPM is still there, running, with its one event.
	var v api.VTPM
	if code := m.call(t, "GET", "/v1/vtpms/"+inst, "", nil, &v); code != 200 || v.Desired != "running" {
		t.Errorf("the vTPM after bodies: %d %+v", code, v)
	}
	var evs api.EventList
	if m.call(t, "GET", "/v1/vtpms/"+inst+"/events", "", nil, &evs); len(evs.Items) != len(evsBefore.Items) {
		t.Errorf("events after bodies: %+v", evs.Items)
	}
	// Without a body, they answer as before.
	if code := m.do(t, host, "GET", "/v1/agent/vtpms/"+inst, nil, nil); code != 200 {
		t.Errorf("a host's read without a body: %d", code)
	}
	if code := m.call(t, "POST", "/v1/vtpms/"+inst+"/stop", "", nil, &v); code != 202 || v.Desired != "stopped" {
		t.Errorf("stop without a body: %d %+v", code, v)
	}
}

// Unknown paths and methods answer the API's JSON error, 405 with Allow.
func TestUnknownRoutesAnswerJSON(t *testing.T) {
	f := newFixture(t)
	for _, c := range []struct {
		method, path string
		status       int
		code         api.Code
		allow        string
	}{
		{"GET", "/v1/nope", 404, api.CodeNotFound, ""},
		{"GET", "/", 404, api.CodeNotFound, ""},
		{"GET", "/v1/vtpms/" + inst + "/nope", 404, api.CodeNotFound, ""},
		{"DELETE", "/v1/hosts", 405, api.CodeMethodNotAllowed, "GET, HEAD"},
		{"PUT", "/v1/vtpms/" + inst, 405, api.CodeMethodNotAllowed, "DELETE, GET, HEAD"},
		{"GET", "/v1/vtpms/" + inst + "/start", 405, api.CodeMethodNotAllowed, "POST"},
	} {
		req, _ := http.NewRequest(c.method, f.url+c.path, nil)
		resp, err := f.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var e api.ErrorBody
		if err := jsonDecode(resp, &e); err != nil || resp.StatusCode != c.status || e.Error.Code != c.code || e.Error.Message == "" ||
			resp.Header.Get("Content-Type") != "application/json" || resp.Header.Get("Allow") != c.allow {
			t.Errorf("%s %s: %d %q allow %q %+v %v", c.method, c.path, resp.StatusCode, resp.Header.Get("Content-Type"), resp.Header.Get("Allow"), e, err)
		}
	}
}

func jsonDecode(resp *http.Response, v any) error {
	defer resp.Body.Close()
	return json.NewDecoder(resp.Body).Decode(v)
}
