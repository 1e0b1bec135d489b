package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/broker"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/console"
	"github.com/vtpmd/vtpmd/internal/enrol"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/secrets"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
)

const inst = "7d7a0c4e-8f4b-4bd2-9d6e-2b8f4f3c1a10"

type fixture struct {
	api    *Server
	srv    *httptest.Server // the API on the network: agents, certificates
	url    string           // the operator's socket, as http://vtpmd over http
	http   *http.Client     // reaches url
	store  *store.Store
	keys   *embedded.Keyring
	dir    string
	token  string              // sent as the agent's bearer token when set
	reopen func() *store.Store // another handle on the same database
	// deploymentCA certifies vTPMs' EKs (GET /v1/ca); hostCA issues
	// hosts' certificates at enrolment.
	deploymentCA, hostCA *ca.CA
}

// setup is what a test changes in the API it runs: by default no verdict
// signing, no Hyper-V URL, a silent log, the real clock.
type setup struct {
	signer *attest.Signer
	hyperV vtpms.HyperVOptions
	log    *slog.Logger
	now    func() time.Time // the store's and the domain's
}

// newFixture runs the API on a real store (storetest) and key manager, with one
// TPM 2.0 host of capacity 2 and no agent: records stay pending.
func newFixture(t testing.TB) *fixture { return newFixtureWith(t, setup{}) }

// newFixtureWith is newFixture with the API set up as s says.
func newFixtureWith(t testing.TB, s setup) *fixture {
	t.Helper()
	dir := t.TempDir()
	reopen := storetest.Opener(t, dir, store.Options{Now: s.now})
	st := reopen()
	kr, err := embedded.Open(context.Background(), st, filepath.Join(dir, "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	f := serveFixture(t, st, kr, dir, s)
	f.reopen = reopen
	return f
}

// serveFixture runs the API on st and kr, with one TPM 2.0 host of
// capacity 2 and no agent, on the network and the operator's socket; a
// deployment CA certifies EKs and a host CA enrols hosts.
func serveFixture(t testing.TB, st *store.Store, kr *embedded.Keyring, dir string, s setup) *fixture {
	t.Helper()
	caps := spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V20}, Models: []spec.Model{spec.TIS, spec.CRB}}
	err := st.Update(context.Background(), func(tx *store.Tx) error {
		return tx.PutHost(&store.Host{Name: "h1", Traits: spec.HostTraits(caps).List(), Capacity: 2, Backend: "swtpm"})
	})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{store: st, keys: kr, dir: dir}
	deployment, err := ca.New(ca.Options{Now: s.now})
	if err != nil {
		t.Fatal(err)
	}
	hostCA, err := ca.New(ca.Options{CommonName: ca.HostCommonName, Now: s.now})
	if err != nil {
		t.Fatal(err)
	}
	f.deploymentCA, f.hostCA = deployment, hostCA
	keys := secrets.New(st, kr, s.log)
	vs := vtpms.New(vtpms.Config{Store: st, Keyring: kr, Secrets: keys, HyperV: s.hyperV, Now: s.now, DriftTimeout: time.Second, Log: s.log})
	ver := verifier.New(verifier.Config{Store: st, VTPMs: vs, CAChainPEM: deployment.ChainPEM, Signer: s.signer, Log: s.log})
	f.api = &Server{VTPMs: vs, Verifier: ver, Secrets: keys, CAChainPEM: deployment.ChainPEM, StoreStats: st, Log: s.log,
		Broker:    broker.New(broker.Config{Store: st, Keyring: kr, Verifier: ver, Now: s.now, Log: s.log}),
		Enrolment: enrol.New(enrol.Config{Store: st, HostCA: hostCA, Now: s.now}),
		Agents:    agentstore.New(st, kr, nil, s.log), EKCA: deployment}
	f.api.Console = console.New(console.Config{Store: st, VTPMs: vs, Verifier: ver, Authenticate: f.api.BrowserViewer, Now: s.now})
	f.srv = httptest.NewServer(f.api.Handler())
	t.Cleanup(f.srv.Close)
	f.url, f.http = "http://vtpmd", operatorSocket(t, f.srv.Config.Handler)
	return f
}

// trusted records instance id as registered and trusted, with fresh
// evidence, as if its agent had attested.
func (f *fixture) trusted(t *testing.T, id string) {
	t.Helper()
	now := time.Now().UTC()
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		return tx.PutAttestation(&store.Attestation{InstanceID: id, RegisteredAt: now, EvidenceAt: now, Verdict: "trusted"})
	})
	if err != nil {
		t.Fatal(err)
	}
}

// operatorSocket serves h on a unix socket as vtpmd does for its operator
// (OperatorConn) and returns a client that reaches it.
func operatorSocket(t testing.TB, h http.Handler) *http.Client {
	t.Helper()
	path := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ConnContext: OperatorConn, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	var d net.Dialer
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return d.DialContext(ctx, "unix", path)
	}}}
}

func TestMain(m *testing.M) { os.Exit(storetest.Main(m)) }

// call sends a request and decodes the JSON answer into out (if non-nil).
func (f *fixture) call(t testing.TB, method, path, project string, body any, out any) int {
	t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	default:
		data, _ := json.Marshal(b)
		r = bytes.NewReader(data)
	}
	req, _ := http.NewRequest(method, f.url+path, r)
	if project != "" {
		req.Header.Set(api.ProjectHeader, project)
	}
	if f.token != "" {
		req.Header.Set("Authorization", "Bearer "+f.token)
	}
	resp, err := f.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if raw, ok := out.(*[]byte); ok {
		*raw = data
		return resp.StatusCode
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s: %d %s: %v", method, path, resp.StatusCode, data, err)
		}
	}
	return resp.StatusCode
}

func create(id string, specs map[string]string) api.CreateVTPMRequest {
	return api.CreateVTPMRequest{InstanceID: id, Project: "p1", ResolveRequest: api.ResolveRequest{FlavorSpecs: specs}}
}

func TestCreateAndRead(t *testing.T) {
	f := newFixture(t)
	var v api.VTPM
	changed := f.store.HostChanged("h1") // the host's agent watches it
	code := f.call(t, "POST", "/v1/vtpms", "", create(strings.ToUpper(inst), map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}), &v)
	if code != http.StatusAccepted || v.InstanceID != inst || v.Phase != "pending" || v.Host != "h1" || v.Spec.Version != "2.0" || *v.Spec.Model != "tpm-crb" {
		t.Fatalf("create: %d %+v", code, v)
	}
	select {
	case <-changed:
	default:
		t.Fatal("the host's watchers were not woken by the create")
	}
	// The secret exists, belongs to the project and is a Nova-style secret.
	sec, err := f.keys.Get(context.Background(), v.SecretRef)
	if err != nil || sec.Project != "p1" || len(sec.Payload) != 512 {
		t.Fatalf("secret: %v project %q len %d", err, sec.Project, len(sec.Payload))
	}
	var got api.VTPM
	if code := f.call(t, "GET", "/v1/vtpms/"+inst, "", nil, &got); code != 200 || got.SecretRef != v.SecretRef {
		t.Fatalf("get: %d %+v", code, got)
	}
	var evs api.EventList
	if f.call(t, "GET", "/v1/vtpms/"+inst+"/events", "", nil, &evs); len(evs.Items) != 1 || evs.Items[0].Action != "created" {
		t.Fatalf("events: %+v", evs)
	}
	var e api.ErrorBody
	if code := f.call(t, "GET", "/v1/vtpms/"+inst+"/identity", "", nil, &e); code != 409 || e.Error.Code != api.CodeNotReady {
		t.Fatalf("identity before manufacture: %d %+v", code, e)
	}
}

func TestCreateRefusals(t *testing.T) {
	f := newFixture(t)
	v20 := map[string]string{"hw:tpm_version": "2.0"}
	if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, v20), nil); code != 202 {
		t.Fatalf("first create: %d", code)
	}
	cases := []struct {
		name    string
		project string
		body    any
		status  int
		code    api.Code
	}{
		{"malformed JSON", "", `{"instance_id": `, 400, api.CodeInvalidJSON},
		{"unknown field", "", `{"instance_id":"` + inst + `","bogus":1}`, 400, api.CodeInvalidJSON},
		{"two values", "", `{} {}`, 400, api.CodeInvalidJSON},
		{"oversized body", "", `{"instance_id":"` + strings.Repeat("a", maxBody) + `"}`, 413, api.CodeBodyTooLarge},
		{"not a uuid", "", create("not-a-uuid", v20), 400, api.CodeInvalidInstanceID},
		{"path trick", "", create("../../etc/passwd", v20), 400, api.CodeInvalidInstanceID},
		{"braced uuid", "", create("{"+inst+"}", v20), 400, api.CodeInvalidInstanceID},
		{"no project", "", api.CreateVTPMRequest{InstanceID: "11111111-2222-4333-8444-555555555555", ResolveRequest: api.ResolveRequest{FlavorSpecs: v20}}, 400, api.CodeInvalidProject},
		{"bad project", "", api.CreateVTPMRequest{InstanceID: "11111111-2222-4333-8444-555555555555", Project: "../x", ResolveRequest: api.ResolveRequest{FlavorSpecs: v20}}, 400, api.CodeInvalidProject},
		{"a project", "p1", create("11111111-2222-4333-8444-555555555555", v20), 403, api.CodeForbidden},
		{"duplicate", "", create(inst, v20), 409, api.CodeAlreadyExists},
		{"refused request", "", create("11111111-2222-4333-8444-555555555555", map[string]string{"hw:tpm_version": "3"}), 400, api.CodeInvalidTPMVersion},
		{"no vTPM asked", "", create("11111111-2222-4333-8444-555555555555", nil), 400, api.CodeNoVTPMRequested},
		{"no host serves 1.2", "", create("11111111-2222-4333-8444-555555555555", map[string]string{"hw:tpm_version": "1.2"}), 409, api.CodeNoValidHost},
	}
	before := secretCount(t, f)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var e api.ErrorBody
			status := f.call(t, "POST", "/v1/vtpms", c.project, c.body, &e)
			if status != c.status || e.Error.Code != c.code || e.Error.Message == "" {
				t.Fatalf("got %d %+v; want %d %s", status, e.Error, c.status, c.code)
			}
		})
	}
	// Nothing was created by any refusal: no record, no secret, no file.
	var list api.VTPMList
	f.call(t, "GET", "/v1/vtpms", "", nil, &list)
	if len(list.Items) != 1 || secretCount(t, f) != before {
		t.Fatalf("refusals left state behind: %d records, %d secrets (was %d)", len(list.Items), secretCount(t, f), before)
	}
	if _, err := os.Stat(filepath.Join(f.dir, "etc")); err == nil {
		t.Fatal("a path trick created a directory")
	}
}

func secretCount(t *testing.T, f *fixture) int {
	ids, err := f.keys.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return len(ids)
}

func TestCapacityAndPlacement(t *testing.T) {
	f := newFixture(t)
	for i, id := range []string{"11111111-0000-4000-8000-000000000001", "11111111-0000-4000-8000-000000000002"} {
		if code := f.call(t, "POST", "/v1/vtpms", "", create(id, map[string]string{"hw:tpm_version": "2.0"}), nil); code != 202 {
			t.Fatalf("create %d: %d", i, code)
		}
	}
	var e api.ErrorBody
	if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), &e); code != 409 || e.Error.Code != api.CodeNoValidHost {
		t.Fatalf("full host: %d %+v", code, e)
	}
	var hosts api.HostList
	f.call(t, "GET", "/v1/hosts", "", nil, &hosts)
	if len(hosts.Items) != 1 || hosts.Items[0].Used != 2 || hosts.Items[0].Capacity != 2 {
		t.Fatalf("hosts: %+v", hosts)
	}
}

func TestProjectsAreIsolated(t *testing.T) {
	f := newFixture(t)
	mine := "22222222-0000-4000-8000-000000000001"
	theirs := "22222222-0000-4000-8000-000000000002"
	f.call(t, "POST", "/v1/vtpms", "", createFor(mine, "alice"), nil)
	f.call(t, "POST", "/v1/vtpms", "", createFor(theirs, "bob"), nil)

	var list api.VTPMList
	f.call(t, "GET", "/v1/vtpms", "alice", nil, &list)
	if len(list.Items) != 1 || list.Items[0].InstanceID != mine || list.Items[0].Project != "alice" {
		t.Fatalf("alice sees %+v", list.Items)
	}
	for _, req := range [][2]string{{"GET", ""}, {"GET", "/identity"}, {"GET", "/events"}, {"POST", "/stop"}, {"DELETE", ""}} {
		if code := f.call(t, req[0], "/v1/vtpms/"+theirs+req[1], "alice", nil, nil); code != 404 {
			t.Errorf("alice %s %s on bob's vTPM: %d; want 404", req[0], req[1], code)
		}
	}
	if code := f.call(t, "GET", "/v1/vtpms?project=bob", "alice", nil, nil); code != 403 {
		t.Errorf("alice listing bob's: %d", code)
	}
	f.call(t, "GET", "/v1/vtpms", "", nil, &list)
	if len(list.Items) != 2 {
		t.Fatalf("operator sees %d vTPMs", len(list.Items))
	}
}

func TestListPages(t *testing.T) {
	f := newFixture(t)
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		if err := tx.PutHost(&store.Host{Name: "h1", Traits: []string{}, Capacity: 100, Backend: "swtpm"}); err != nil {
			return err
		}
		for i := range 7 {
			v := &store.VTPM{InstanceID: "33333333-0000-4000-8000-00000000000" + string(rune('0'+i)), Project: "p", Host: "h1",
				Spec: spec.Spec{Version: spec.V20, Model: spec.TIS, SecretSecurity: spec.User}, Desired: store.DesiredRunning, Phase: store.PhasePending}
			if i == 4 {
				v.Phase = store.PhaseError
			}
			if err := tx.CreateVTPM(v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	after := ""
	for pages := 0; ; pages++ {
		var page api.VTPMList
		if code := f.call(t, "GET", "/v1/vtpms?limit=3&after="+after, "", nil, &page); code != 200 || pages > 5 {
			t.Fatalf("page: %d", code)
		}
		for _, v := range page.Items {
			seen = append(seen, v.InstanceID)
		}
		if page.Next == "" {
			break
		}
		after = page.Next
	}
	if len(seen) != 7 || !sort.StringsAreSorted(seen) {
		t.Fatalf("paged through %v", seen)
	}
	var errs api.VTPMList
	f.call(t, "GET", "/v1/vtpms?phase=error", "", nil, &errs)
	if len(errs.Items) != 1 {
		t.Fatalf("phase filter: %+v", errs.Items)
	}
	for _, q := range []string{"limit=0", "limit=x", "limit=1001", "phase=bogus"} {
		var e api.ErrorBody
		if code := f.call(t, "GET", "/v1/vtpms?"+q, "", nil, &e); code != 400 || e.Error.Code != api.CodeInvalidParameter {
			t.Errorf("%s: %d %+v", q, code, e)
		}
	}
}

func TestDesiredState(t *testing.T) {
	f := newFixture(t)
	f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil)
	var v api.VTPM
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/stop", "", nil, &v); code != 202 || v.Desired != "stopped" {
		t.Fatalf("stop: %d %+v", code, v)
	}
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/stop", "", nil, &v); code != 202 || v.Desired != "stopped" {
		t.Fatalf("stop again: %d %+v", code, v)
	}
	// No agent ever acted on it: nothing on a host, so it goes at once.
	if code := f.call(t, "DELETE", "/v1/vtpms/"+inst, "", nil, &v); code != 200 || v.Phase != "deleted" || v.Desired != "deleted" {
		t.Fatalf("delete of an untouched vTPM: %d %+v", code, v)
	}
	var e api.ErrorBody
	if code := f.call(t, "GET", "/v1/vtpms/"+inst, "", nil, &e); code != 404 {
		t.Fatalf("after deleting an untouched vTPM: %d", code)
	}
	if _, err := f.keys.Get(context.Background(), v.SecretRef); err == nil {
		t.Fatal("the untouched vTPM's secret outlived it")
	}
	// Once an agent acted on it, the agent finishes the delete; the secret
	// is shredded before the delete is answered.
	f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil)
	f.store.Update(context.Background(), func(tx *store.Tx) error {
		return tx.AppendEvent(store.Event{Actor: "agent:h1", InstanceID: inst, Action: "provisioning"})
	})
	if code := f.call(t, "DELETE", "/v1/vtpms/"+inst, "", nil, &v); code != 202 || v.Desired != "deleted" {
		t.Fatalf("delete: %d %+v", code, v)
	}
	if _, err := f.keys.Get(context.Background(), v.SecretRef); !errors.Is(err, keyring.ErrNotFound) {
		t.Fatalf("the secret of a vTPM being deleted is still there: %v", err)
	}
	if code := f.call(t, "DELETE", "/v1/vtpms/"+inst, "", nil, &v); code != 202 || v.Desired != "deleted" {
		t.Fatalf("delete again: %d %+v", code, v)
	}
	if code := f.call(t, "POST", "/v1/vtpms/"+inst+"/start", "", nil, &e); code != 409 {
		t.Fatalf("start while deleting: %d %+v", code, e)
	}
	if code := f.call(t, "GET", "/v1/vtpms/11111111-0000-4000-8000-00000000000f", "", nil, &e); code != 404 || e.Error.Code != api.CodeNotFound {
		t.Fatalf("unknown id: %d %+v", code, e)
	}
	if code := f.call(t, "GET", "/v1/vtpms/..%2f..%2fetc", "", nil, &e); code != 400 && code != 404 {
		t.Fatalf("path trick: %d", code)
	}
}

func TestResolveEndpoint(t *testing.T) {
	f := newFixture(t)
	var res api.Resolution
	if code := f.call(t, "POST", "/v1/resolve", "", api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}, &res); code != 200 || res.VTPM == nil || len(res.RequiredTraits) != 3 {
		t.Fatalf("resolve: %d %+v", code, res)
	}
	var e api.ErrorBody
	code := f.call(t, "POST", "/v1/resolve", "", api.ResolveRequest{FlavorName: "m1.small", FlavorSpecs: map[string]string{"hw:tpm_version": "1.2"},
		ImageName: "win11", ImageProps: map[string]string{"hw_tpm_version": "2.0"}}, &e)
	want := "Flavor m1.small has hw:tpm_version extra spec explicitly set to 1.2, conflicting with image win11 which has hw_tpm_version explicitly set to 2.0."
	if code != 400 || e.Error.Code != api.CodeFlavorImageConflict || e.Error.Message != want {
		t.Fatalf("refused resolve: %d %+v", code, e)
	}

	// An empty image property survives the JSON and is refused, as Nova
	// refuses it while typing the image: it does not mean unset.
	e = api.ErrorBody{}
	code = f.call(t, "POST", "/v1/resolve", "", api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"},
		ImageName: "win11", ImageProps: map[string]string{"hw_tpm_model": ""}}, &e)
	if code != 400 || e.Error.Code != api.CodeInvalidTPMModel {
		t.Fatalf("empty image model: %d %+v", code, e)
	}
}

// TestOpenAPIMatchesHandlers: every route is documented with its method,
// and the document lists nothing the server does not serve.
func TestOpenAPIMatchesHandlers(t *testing.T) {
	var doc struct {
		Paths map[string]map[string]json.RawMessage `json:"paths"`
	}
	if err := json.Unmarshal(api.OpenAPI, &doc); err != nil {
		t.Fatal(err)
	}
	var documented []string
	for path, ops := range doc.Paths {
		for method := range ops {
			documented = append(documented, strings.ToUpper(method)+" "+path)
		}
	}
	served := []string{"GET /metrics"}
	for _, r := range (&Server{}).routes() {
		served = append(served, r.pattern)
	}
	sort.Strings(documented)
	sort.Strings(served)
	if !slices.Equal(documented, served) {
		t.Fatalf("OpenAPI and handlers differ:\ndocumented %v\nserved     %v", documented, served)
	}
}

func TestMetricsAndHealth(t *testing.T) {
	f := newFixture(t)
	f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil)
	if code := f.call(t, "GET", "/healthz", "", nil, nil); code != 200 {
		t.Fatalf("healthz: %d", code)
	}
	before := f.store.Statements()
	resp, err := f.http.Get(f.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`vtpmd_vtpms{phase="pending"} 1`, `vtpmd_http_requests_total{code="202",route="POST /v1/vtpms"} 1`,
		"\nvtpmd_event_log_cache_hits_total 0\n", "\nvtpmd_event_log_cache_misses_total 0\n", "\nvtpmd_event_log_cache_bytes 0\n", "\nvtpmd_store_retries_total 0\n"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	// The store's statements so far: the create's, and maybe the
	// scrape's own read of the phases.
	m := regexp.MustCompile(`(?m)^vtpmd_store_statements_total (\d+)$`).FindStringSubmatch(string(body))
	if m == nil {
		t.Fatal("metrics lack vtpmd_store_statements_total")
	}
	if n, _ := strconv.ParseInt(m[1], 10, 64); n < before || n > f.store.Statements() {
		t.Errorf("vtpmd_store_statements_total %d: the store had run %d statements before the scrape, %d after", n, before, f.store.Statements())
	}
}

func TestAttachDetach(t *testing.T) {
	f := newFixture(t)
	v20 := map[string]string{"hw:tpm_version": "2.0"}
	if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, v20), nil); code != 202 {
		t.Fatalf("create: %d", code)
	}
	path := "/v1/vtpms/" + inst
	var e api.ErrorBody
	// h1 runs the swtpm backend: nothing to attach to.
	if code := f.call(t, "POST", path+"/attach", "", api.AttachRequest{Domain: "guest1"}, &e); code != 409 || e.Error.Code != api.CodeNotSupported {
		t.Fatalf("attach on a swtpm host: %d %+v", code, e)
	}
	err := f.store.Update(context.Background(), func(tx *store.Tx) error {
		h, err := tx.GetHost("h1")
		if err != nil {
			return err
		}
		h.Backend = "libvirt"
		return tx.PutHost(h)
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "../etc", "a b", "<x>", strings.Repeat("d", 129)} {
		if code := f.call(t, "POST", path+"/attach", "", api.AttachRequest{Domain: bad}, &e); code != 400 || e.Error.Code != api.CodeInvalidParameter {
			t.Fatalf("attach to %q: %d %+v", bad, code, e)
		}
	}
	var v api.VTPM
	for range 2 { // repeating is harmless
		if code := f.call(t, "POST", path+"/attach", "p1", api.AttachRequest{Domain: "guest1"}, &v); code != 202 || v.Domain != "guest1" {
			t.Fatalf("attach: %d %+v", code, v)
		}
	}
	if code := f.call(t, "POST", path+"/attach", "", api.AttachRequest{Domain: "guest2"}, &e); code != 409 || e.Error.Code != api.CodeConflict {
		t.Fatalf("attach to a second domain: %d %+v", code, e)
	}
	if code := f.call(t, "POST", path+"/attach", "p2", api.AttachRequest{Domain: "guest1"}, &e); code != 404 {
		t.Fatalf("attach by another project: %d", code)
	}
	v = api.VTPM{}
	if code := f.call(t, "POST", path+"/detach", "", nil, &v); code != 202 || v.Domain != "" {
		t.Fatalf("detach: %d %+v", code, v)
	}
	var events api.EventList
	f.call(t, "GET", path+"/events", "", nil, &events)
	if n := len(events.Items); n != 3 || events.Items[1].Action != "attach to domain guest1" || events.Items[2].Action != "detach" {
		t.Fatalf("events: %+v", events.Items)
	}

	// Drift is the operator's, and the host's agent answers it through its
	// watch; without an agent answering, the host is unavailable.
	if code := f.call(t, "GET", "/v1/hosts/h1/drift", "p1", nil, &e); code != 403 {
		t.Fatalf("drift as a tenant: %d", code)
	}
	if code := f.call(t, "GET", "/v1/hosts/nope/drift", "", nil, &e); code != 404 {
		t.Fatalf("drift of an unknown host: %d", code)
	}
	if code := f.call(t, "GET", "/v1/hosts/h1/drift", "", nil, &e); code != 503 || e.Error.Code != api.CodeHostUnavailable {
		t.Fatalf("drift with no agent answering: %d %+v", code, e)
	}
	ctx := context.Background()
	answered := make(chan agent.DriftAsk, 1)
	go func() { // h1's agent
		var since int64
		for {
			ch, err := f.api.Agents.Watch(ctx, "h1", since, time.Minute)
			if err != nil {
				t.Error(err)
				return
			}
			since = ch.Revision
			if ch.Drift.ID != 0 {
				finding := api.Finding{Kind: "orphan_state", Object: "/var/lib/vtpmd/vtpms/x", Detail: "no record", Deleted: ch.Drift.Repair}
				if err := f.api.Agents.ReportDrift(ctx, "h1", ch.Drift.ID, []api.Finding{finding}); err != nil {
					t.Error(err)
				}
				if ch.Drift.Repair {
					answered <- ch.Drift
					return
				}
			}
		}
	}()
	var d api.Drift
	if code := f.call(t, "POST", "/v1/hosts/h1/drift/repair", "", nil, &d); code != 200 || len(d.Findings) != 1 || !d.Findings[0].Deleted || d.Host != "h1" {
		t.Fatalf("a repair the agent answered: %d %+v", code, d)
	}
	if ask := <-answered; !ask.Repair {
		t.Fatalf("the agent was asked %+v, not to repair", ask)
	}
}

func TestAttestationRefusals(t *testing.T) {
	f := newFixture(t)
	if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil); code != 202 {
		t.Fatalf("create: %d", code)
	}
	base := "/v1/vtpms/" + inst + "/attestation"
	for _, c := range []struct {
		method, path, project string
		body                  any
		status                int
		code                  api.Code
	}{
		{"GET", base, "", nil, 404, api.CodeNotRegistered},
		{"GET", base, "p2", nil, 404, api.CodeNotFound},
		{"POST", base + "/register", "", api.RegisterRequest{AKPublic: []byte{1, 2, 3}}, 409, api.CodeNotReady}, // not manufactured
		{"POST", base + "/register", "", `{"ak_public": 5}`, 400, api.CodeInvalidJSON},
		{"POST", base + "/activate", "", api.ActivateRequest{Secret: []byte("x")}, 400, api.CodeInvalidParameter},
		{"POST", base + "/activate", "", api.ActivateRequest{Ticket: []byte(`{"sub":"` + inst + `"}`), Secret: []byte("x")}, 403, api.CodeActivationFailed},
		{"POST", base + "/nonce", "", nil, 409, api.CodeNotRegistered},
		{"POST", base + "/evidence", "", api.EvidenceRequest{Nonce: []byte("n")}, 409, api.CodeNotRegistered},
		{"POST", base + "/policy", "", api.PolicyRequest{}, 400, api.CodeInvalidParameter},
		{"POST", base + "/policy", "", api.PolicyRequest{Learn: true, PCRs: []int{24}}, 400, api.CodeInvalidParameter},
		{"POST", base + "/policy", "", api.PolicyRequest{Learn: true}, 409, api.CodeNoEvidence},
		{"POST", "/v1/vtpms/not-a-uuid/attestation/nonce", "", nil, 400, api.CodeInvalidInstanceID},
		{"GET", base, "", nil, 404, api.CodeNotRegistered}, // refusals left no record behind
	} {
		var e api.ErrorBody
		if got := f.call(t, c.method, c.path, c.project, c.body, &e); got != c.status || e.Error.Code != c.code {
			t.Errorf("%s %s: %d %q, want %d %q", c.method, c.path, got, e.Error.Code, c.status, c.code)
		}
	}
}

// On the network, nobody unauthenticated is the operator or a tenant,
// whatever X-Project-ID says: every tenants' and operator's route answers
// 401 and changes nothing (a host credential minted this way would
// release tenants' keys). Agents' and public routes stay open. The
// operator's socket is the operator, named by its local user.
func TestNetworkCallersAreNobody(t *testing.T) {
	f := newFixture(t)
	if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil); code != 202 {
		t.Fatalf("create on the operator's socket: %d", code)
	}
	before := secretCount(t, f)
	for _, r := range f.api.routes() {
		method, path, _ := strings.Cut(r.pattern, " ")
		path = strings.NewReplacer("{id}", inst, "{name}", "h1").Replace(path)
		for _, project := range []string{"", "p1"} {
			req, _ := http.NewRequest(method, f.srv.URL+path, strings.NewReader(`{}`))
			if project != "" {
				req.Header.Set(api.ProjectHeader, project)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			var e api.ErrorBody
			json.NewDecoder(resp.Body).Decode(&e)
			resp.Body.Close()
			switch {
			case (r.access == callers || r.access == operator) && (resp.StatusCode != 401 || e.Error.Code != api.CodeUnauthenticated):
				t.Errorf("%s %s as %q from the network: %d %q, want 401", method, path, project, resp.StatusCode, e.Error.Code)
			case r.access == anyone && resp.StatusCode == 401:
				t.Errorf("%s %s is public but answered 401", method, path)
			}
		}
	}
	if resp, err := http.Get(f.srv.URL + "/metrics"); err != nil || resp.StatusCode != 401 {
		t.Errorf("metrics from the network: %v %v", resp, err)
	}
	if got := secretCount(t, f); got != before {
		t.Errorf("secrets: %d before, %d after the network's calls", before, got)
	}
	var v api.VTPM
	if code := f.call(t, "GET", "/v1/vtpms/"+inst, "", nil, &v); code != 200 || v.Desired != "running" {
		t.Errorf("the vTPM after the network's calls: %d %+v", code, v)
	}
	var evs api.EventList
	f.call(t, "GET", "/v1/vtpms/"+inst+"/events", "", nil, &evs)
	if len(evs.Items) != 1 || !strings.HasPrefix(evs.Items[0].Actor, `api:operator ("uid `) {
		t.Errorf("events: %+v, want only the create, by the local operator", evs.Items)
	}
}

// TestCreateStatements: a create costs the store at most eight statements
// (PostgreSQL): whether the instance has a vTPM and the hosts with their
// loads, read before its secret is made; the embedded key manager's sealed
// secret (stored if the master key is the store's); then, in the transaction that
// records it, the host's room, its watch revision, the record, its event
// and the notification. Counted, not timed, so that a read of what was just
// written shows. The first create also records the master key's id.
func TestCreateStatements(t *testing.T) {
	f := newFixture(t)
	if code := f.call(t, "POST", "/v1/vtpms", "", createFor("0f0f0f0f-0000-4000-8000-000000000001", "p1"), nil); code != 202 {
		t.Fatalf("first create: %d", code)
	}
	before := f.store.Statements()
	if code := f.call(t, "POST", "/v1/vtpms", "", createFor(inst, "p1"), nil); code != 202 {
		t.Fatalf("create: %d", code)
	}
	if n := f.store.Statements() - before; n > 8 {
		t.Errorf("a create ran %d statements, want at most 8", n)
	}
}
