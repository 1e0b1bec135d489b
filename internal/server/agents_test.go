package server

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
)

// The agent protocol's vTPM routes over mTLS, each host's agent with the
// certificate it got at enrolment, on the fixture's store and key manager.

const (
	onA      = "44444444-0000-4000-8000-00000000000a"
	onAToo   = "44444444-0000-4000-8000-0000000000a2"
	onB      = "44444444-0000-4000-8000-00000000000b"
	crb, tis = "tpm-crb", "tpm-tis"
)

// agentHosts is the API over mTLS with two hosts whose agents enrolled
// and registered: ha offers TPM 2.0 CRB and hb TPM 2.0 TIS, so a vTPM's
// model places it. The fixture's h1, which offers both, is drained.
type agentHosts struct {
	*mtls
	a, b *http.Client // ha's and hb's agents
}

func newAgentHosts(t *testing.T) *agentHosts {
	t.Helper()
	m := newMTLS(t)
	w := &agentHosts{mtls: m, a: m.client(m.enrol(t, "ha")), b: m.client(m.enrol(t, "hb"))}
	for c, model := range map[*http.Client]spec.Model{w.a: spec.CRB, w.b: spec.TIS} {
		caps := spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V20}, Models: []spec.Model{model}}
		reg := api.AgentHost{Traits: spec.HostTraits(caps).List(), Capacity: 4, Backend: "swtpm", Version: "test"}
		if code := m.do(t, c, "PUT", "/v1/agent/host", reg, nil); code != 204 {
			t.Fatalf("registering the %s host: %d", model, code)
		}
	}
	if code := m.call(t, "POST", "/v1/hosts/h1/drain", "", nil, nil); code != 200 {
		t.Fatalf("drain h1: %d", code)
	}
	return w
}

// create has the operator create a vTPM of model for project p1, and
// checks the host it was placed on.
func (w *agentHosts) create(t *testing.T, id, model, host string) api.VTPM {
	t.Helper()
	var v api.VTPM
	req := create(id, map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": model})
	if code := w.call(t, "POST", "/v1/vtpms", "", req, &v); code != 202 || v.Host != host {
		t.Fatalf("create %s (%s): %d %+v, want it on %s", id, model, code, v, host)
	}
	return v
}

// read is the vTPM as host's agent reads it.
func (w *agentHosts) read(t *testing.T, host *http.Client, id string) api.AgentVTPM {
	t.Helper()
	var v api.AgentVTPM
	if code := w.do(t, host, "GET", "/v1/agent/vtpms/"+id, nil, &v); code != 200 {
		t.Fatalf("agent reads %s: %d", id, code)
	}
	return v
}

// operatorView is the vTPM as the operator reads it; the status too.
func (w *agentHosts) operatorView(t *testing.T, id string) (int, api.VTPM) {
	t.Helper()
	var v api.VTPM
	code := w.call(t, "GET", "/v1/vtpms/"+id, "", nil, &v)
	return code, v
}

// refused checks that a request answered status with code.
func refused(t *testing.T, what string, status int, e api.ErrorBody, wantStatus int, want api.Code) {
	t.Helper()
	if status != wantStatus || e.Error.Code != want || e.Error.Message == "" {
		t.Errorf("%s: %d %+v, want %d %s", what, status, e, wantStatus, want)
	}
}

func publicDER(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func p256(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// A host's agent registers what its backend offers, for the host its
// certificate names: traits sorted and deduplicated, capacity, backend,
// version, and a heartbeat. Bad registrations are refused and change
// nothing.
func TestAgentRegistersHost(t *testing.T) {
	m := newMTLS(t)
	c := m.client(m.enrol(t, "hr"))
	reg := api.AgentHost{Traits: []string{"CUSTOM_RACK_7", spec.TraitTPM20, "CUSTOM_RACK_7"}, Capacity: 7, Backend: "libvirt", Version: "v2.1"}
	if code := m.do(t, c, "PUT", "/v1/agent/host", reg, nil); code != 204 {
		t.Fatalf("register: %d", code)
	}
	h := m.hostNamed(t, "hr")
	if h.State != "up" || !slices.Equal(h.Traits, []string{spec.TraitTPM20, "CUSTOM_RACK_7"}) || h.Capacity != 7 || h.Backend != "libvirt" ||
		h.Version != "v2.1" || !h.LastHeartbeat.Equal(m.clock.Now()) {
		t.Fatalf("the host after its registration: %+v", h)
	}

	m.clock.advance(time.Minute) // a registration taken would move the heartbeat
	many := make([]string, maxTraits+1)
	for i := range many {
		many[i] = fmt.Sprintf("CUSTOM_T%d", i)
	}
	for name, bad := range map[string]api.AgentHost{
		"negative capacity":      {Capacity: -1, Backend: "swtpm"},
		"capacity beyond 100000": {Capacity: 100001, Backend: "swtpm"},
		"no backend":             {Capacity: 1},
		"long backend":           {Capacity: 1, Backend: strings.Repeat("b", 33)},
		"long version":           {Capacity: 1, Backend: "swtpm", Version: strings.Repeat("v", 129)},
		"too many traits":        {Capacity: 1, Backend: "swtpm", Traits: many},
		"lower case trait":       {Capacity: 1, Backend: "swtpm", Traits: []string{"compute_security_tpm_2_0"}},
		"foreign namespace":      {Capacity: 1, Backend: "swtpm", Traits: []string{"HW_CPU_X86_AVX2"}},
		"empty custom":           {Capacity: 1, Backend: "swtpm", Traits: []string{"CUSTOM_"}},
		"dash in trait":          {Capacity: 1, Backend: "swtpm", Traits: []string{"CUSTOM_A-B"}},
	} {
		var e api.ErrorBody
		code := m.do(t, c, "PUT", "/v1/agent/host", bad, &e)
		refused(t, name, code, e, 400, api.CodeInvalidParameter)
	}
	if after := m.hostNamed(t, "hr"); !reflect.DeepEqual(after, h) {
		t.Errorf("refused registrations changed the host:\n%+v\nwas\n%+v", after, h)
	}
	// Exactly 64 traits are taken.
	reg.Traits = many[:maxTraits]
	if code := m.do(t, c, "PUT", "/v1/agent/host", reg, nil); code != 204 {
		t.Fatalf("register with %d traits: %d", maxTraits, code)
	}
	if h := m.hostNamed(t, "hr"); len(h.Traits) != maxTraits || !h.LastHeartbeat.Equal(m.clock.Now()) {
		t.Errorf("the host after registering %d traits: %+v", maxTraits, h)
	}
}

// A watch from 0 is the host's whole set (reset), and only its vTPMs; a
// watch from the revision it answered waits, for a change to one of the
// host's vTPMs alone, and answers exactly that one.
func TestAgentWatch(t *testing.T) {
	w := newAgentHosts(t)
	a := w.create(t, onA, crb, "ha")
	a2 := w.create(t, onAToo, crb, "ha")
	w.create(t, onB, tis, "hb")

	for _, q := range []string{"", "?since=0"} {
		var ch api.AgentChanges
		if code := w.do(t, w.a, "GET", "/v1/agent/vtpms"+q, nil, &ch); code != 200 {
			t.Fatalf("watch%s: %d", q, code)
		}
		if !ch.Reset || ch.Revision <= 0 || len(ch.Gone) != 0 || len(ch.VTPMs) != 2 {
			t.Fatalf("watch%s: %+v, want a reset with ha's two vTPMs", q, ch)
		}
		for i, want := range []api.VTPM{a, a2} {
			got := ch.VTPMs[i]
			if got.InstanceID != want.InstanceID || got.Incarnation != want.Incarnation || got.Host != "ha" || got.Project != "p1" ||
				got.Desired != "running" || got.Phase != "pending" || got.SecretRef != want.SecretRef || got.Spec.Version != "2.0" ||
				got.Spec.Model == nil || *got.Spec.Model != crb || got.Generation <= 0 || got.EKs == nil || len(got.EKs) != 0 {
				t.Errorf("watch%s: vTPM %d is %+v, want %+v", q, i, got, want)
			}
		}
	}
	var ch api.AgentChanges
	w.do(t, w.a, "GET", "/v1/agent/vtpms?since=0", nil, &ch)
	rev := ch.Revision

	// Nothing changed: the watch waits out its wait and answers nothing.
	start := time.Now()
	var idle api.AgentChanges
	if code := w.do(t, w.a, "GET", fmt.Sprintf("/v1/agent/vtpms?since=%d&wait=300ms", rev), nil, &idle); code != 200 ||
		idle.Reset || idle.Revision != rev || len(idle.VTPMs) != 0 || len(idle.Gone) != 0 {
		t.Fatalf("an idle watch: %d %+v", code, idle)
	}
	if waited := time.Since(start); waited < 300*time.Millisecond {
		t.Fatalf("an idle watch answered after %v, before its wait", waited)
	}

	// A waiting watch: hb's vTPM changing does not answer it; ha's does.
	type answer struct {
		status int
		ch     api.AgentChanges
		err    error
	}
	done := make(chan answer, 1)
	go func() {
		var ans answer
		resp, err := w.a.Get(fmt.Sprintf("%s/v1/agent/vtpms?since=%d&wait=30s", w.srv.URL, rev))
		if err == nil {
			ans.status = resp.StatusCode
			ans.err = json.NewDecoder(resp.Body).Decode(&ans.ch)
			resp.Body.Close()
		}
		ans.err = errors.Join(ans.err, err)
		done <- ans
	}()
	time.Sleep(200 * time.Millisecond)
	if code := w.call(t, "POST", "/v1/vtpms/"+onB+"/stop", "", nil, nil); code != 202 {
		t.Fatalf("stop hb's vTPM: %d", code)
	}
	select {
	case ans := <-done:
		t.Fatalf("the watch answered before any change on its host: %+v", ans)
	case <-time.After(300 * time.Millisecond):
	}
	if code := w.call(t, "POST", "/v1/vtpms/"+onA+"/stop", "", nil, nil); code != 202 {
		t.Fatalf("stop: %d", code)
	}
	select {
	case ans := <-done:
		if ans.err != nil || ans.status != 200 || ans.ch.Reset || ans.ch.Revision <= rev || len(ans.ch.Gone) != 0 ||
			len(ans.ch.VTPMs) != 1 || ans.ch.VTPMs[0].InstanceID != onA || ans.ch.VTPMs[0].Desired != "stopped" {
			t.Fatalf("the watch after the stop: %+v", ans)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the stop did not answer the waiting watch")
	}

	for _, q := range []string{"since=-1", "since=x", "since=1.5", "wait=6m", "wait=-1s", "wait=soon"} {
		var e api.ErrorBody
		code := w.do(t, w.a, "GET", "/v1/agent/vtpms?"+q, nil, &e)
		refused(t, q, code, e, 400, api.CodeInvalidParameter)
	}
}

// A host asking for a vTPM placed on another host is refused on every
// route, whatever it asks; each attempt is the vTPM's event in the
// asking host's name, which the operator and the tenant see; the vTPM,
// its record and its secret are untouched.
func TestAgentHostsReachOnlyTheirVTPMs(t *testing.T) {
	w := newAgentHosts(t)
	b := w.create(t, onB, tis, "hb")
	before := w.read(t, w.b, onB)
	_, opBefore := w.operatorView(t, onB)
	secrets := secretCount(t, w.fixture)
	event := api.AgentEvent{Action: "tried"}
	for _, c := range []struct {
		method, path string
		body         any
	}{
		{"GET", "/v1/agent/vtpms/" + onB, nil},
		{"PUT", "/v1/agent/vtpms/" + onB, api.AgentReport{Incarnation: before.Incarnation, Generation: before.Generation, Phase: "error", Reason: "no", EKs: []api.AgentEK{}, Event: event}},
		{"GET", "/v1/agent/vtpms/" + onB + "/secret", nil},
		{"POST", "/v1/agent/vtpms/" + onB + "/rekey", api.AgentRekey{Incarnation: before.Incarnation, Generation: before.Generation, Payload: []byte("mine now"), Event: event}},
		{"POST", "/v1/agent/vtpms/" + onB + "/deleted", api.AgentDeletion{Incarnation: before.Incarnation, Generation: before.Generation, Event: event}},
		{"POST", "/v1/agent/ek-certificates", api.EKCertificateRequest{InstanceID: onB, TPMVersion: "2.0", Public: publicDER(t, p256(t))}},
	} {
		var e api.ErrorBody
		code := w.do(t, w.a, c.method, c.path, c.body, &e)
		refused(t, "ha: "+c.method+" "+c.path, code, e, 403, api.CodeForbidden)
	}

	if after := w.read(t, w.b, onB); !reflect.DeepEqual(after, before) {
		t.Errorf("hb's record after ha's attempts:\n%+v\nwas\n%+v", after, before)
	}
	if _, after := w.operatorView(t, onB); !reflect.DeepEqual(after, opBefore) {
		t.Errorf("the vTPM after ha's attempts:\n%+v\nwas\n%+v", after, opBefore)
	}
	if sec, err := w.keys.Get(context.Background(), b.SecretRef); err != nil || secretCount(t, w.fixture) != secrets {
		t.Errorf("secrets after ha's attempts: %v, %d (were %d)", err, secretCount(t, w.fixture), secrets)
	} else if got := w.agentSecret(t, w.b, onB); !bytes.Equal(got.Payload, sec.Payload) {
		t.Error("hb's secret changed")
	}

	for _, project := range []string{"", "p1"} {
		var evs api.EventList
		if code := w.call(t, "GET", "/v1/vtpms/"+onB+"/events", project, nil, &evs); code != 200 || len(evs.Items) != 7 || evs.Items[0].Action != "created" {
			t.Fatalf("events as %q: %d %+v, want the create and six refusals", project, code, evs.Items)
		}
		for _, ev := range evs.Items[1:] {
			if ev.Actor != "host:ha" || ev.Action != "refused" || ev.Detail != "host ha asked for this vTPM, which is placed on hb" || ev.Incarnation != b.Incarnation {
				t.Errorf("event as %q: %+v", project, ev)
			}
		}
	}
}

// agentSecret is the secret of id as host's agent reads it.
func (w *agentHosts) agentSecret(t *testing.T, host *http.Client, id string) api.AgentSecret {
	t.Helper()
	var s api.AgentSecret
	if code := w.do(t, host, "GET", "/v1/agent/vtpms/"+id+"/secret", nil, &s); code != 200 {
		t.Fatalf("agent reads the secret of %s: %d", id, code)
	}
	return s
}

// A report records what the agent observed, at the generation it read:
// phase, reason, EKs, sockets and its event; never what was asked of the
// vTPM. A stale generation, an unknown phase, changed EKs, another
// incarnation and fields of the desired state are refused and change
// nothing.
func TestAgentReport(t *testing.T) {
	w := newAgentHosts(t)
	v := w.create(t, onA, crb, "ha")
	cur := w.read(t, w.a, onA)
	ek := api.AgentEK{Kind: "ecc", Handle: 0x81010002, Public: publicDER(t, p256(t))}
	rep := api.AgentReport{Incarnation: cur.Incarnation, Generation: cur.Generation, Phase: "active", EKs: []api.AgentEK{ek},
		Sockets: &api.Sockets{Data: "/run/vtpmd/a.sock", Ctrl: "/run/vtpmd/a.ctrl"}, Event: api.AgentEvent{Action: "started", Detail: "swtpm runs"}}
	var wr api.AgentWritten
	if code := w.do(t, w.a, "PUT", "/v1/agent/vtpms/"+onA, rep, &wr); code != 200 || wr.Generation <= cur.Generation || wr.SecretRef != v.SecretRef {
		t.Fatalf("report: %d %+v (read at generation %d)", code, wr, cur.Generation)
	}
	reported := w.read(t, w.a, onA)
	if reported.Generation != wr.Generation || reported.Phase != "active" || !reflect.DeepEqual(reported.EKs, rep.EKs) ||
		!reflect.DeepEqual(reported.Sockets, rep.Sockets) || reported.Desired != "running" || reported.Host != "ha" {
		t.Fatalf("the record after the report: %+v", reported)
	}
	if _, op := w.operatorView(t, onA); op.Phase != "active" || op.Sockets == nil || *op.Sockets != *rep.Sockets || op.Desired != "running" {
		t.Fatalf("the operator's view after the report: %+v", op)
	}

	next := rep
	next.Generation = wr.Generation
	withPhase := next
	withPhase.Phase = "running"
	otherEK := next
	otherEK.EKs = []api.AgentEK{{Kind: "ecc", Handle: 0x81010002, Public: publicDER(t, p256(t))}}
	noEK := next
	noEK.EKs = nil
	otherIncarnation := next
	otherIncarnation.Incarnation = "another"
	raw, _ := json.Marshal(next)
	asking := `{"desired":"deleted","host":"hb",` + string(raw[1:])
	for _, c := range []struct {
		name   string
		body   any
		status int
		code   api.Code
	}{
		{"stale generation", rep, 409, api.CodeConflict},
		{"unknown phase", withPhase, 400, api.CodeInvalidParameter},
		{"changed EK", otherEK, 400, api.CodeInvalidParameter},
		{"EKs dropped", noEK, 400, api.CodeInvalidParameter},
		{"another incarnation", otherIncarnation, 404, api.CodeNotFound},
		// The desired state and the host are not an agent's to report:
		// decoding is strict, so the fields are refused, not ignored.
		{"desired state and host", asking, 400, api.CodeInvalidJSON},
	} {
		var e api.ErrorBody
		code := w.do(t, w.a, "PUT", "/v1/agent/vtpms/"+onA, c.body, &e)
		refused(t, c.name, code, e, c.status, c.code)
	}
	if after := w.read(t, w.a, onA); !reflect.DeepEqual(after, reported) {
		t.Errorf("refused reports changed the record:\n%+v\nwas\n%+v", after, reported)
	}
	var evs api.EventList
	w.call(t, "GET", "/v1/vtpms/"+onA+"/events", "", nil, &evs)
	if len(evs.Items) != 2 || evs.Items[1] != (api.Event{At: evs.Items[1].At, Actor: "agent:ha", Action: "started", Detail: "swtpm runs", Incarnation: v.Incarnation}) {
		t.Errorf("events: %+v, want the create and the report", evs.Items)
	}
}

// A vTPM not yet manufactured can be given a secret from the agent's
// pool: the record points at it, the old one is shredded, and the secret
// route releases the new one. Once its EKs are recorded, it cannot.
func TestAgentRekey(t *testing.T) {
	w := newAgentHosts(t)
	v := w.create(t, onA, crb, "ha")
	cur := w.read(t, w.a, onA)
	pooled := bytes.Repeat([]byte{7}, 512)
	var e api.ErrorBody
	code := w.do(t, w.a, "POST", "/v1/agent/vtpms/"+onA+"/rekey", api.AgentRekey{Incarnation: cur.Incarnation, Generation: cur.Generation, Event: api.AgentEvent{Action: "rekeyed"}}, &e)
	refused(t, "an empty secret", code, e, 400, api.CodeInvalidParameter)

	var wr api.AgentWritten
	rekey := api.AgentRekey{Incarnation: cur.Incarnation, Generation: cur.Generation, Payload: pooled, Event: api.AgentEvent{Action: "rekeyed"}}
	if code := w.do(t, w.a, "POST", "/v1/agent/vtpms/"+onA+"/rekey", rekey, &wr); code != 200 || wr.SecretRef == v.SecretRef || wr.Generation <= cur.Generation {
		t.Fatalf("rekey: %d %+v", code, wr)
	}
	if _, err := w.keys.Get(context.Background(), v.SecretRef); !errors.Is(err, keyring.ErrNotFound) {
		t.Errorf("the old secret after the rekey: %v", err)
	}
	if sec, err := w.keys.Get(context.Background(), wr.SecretRef); err != nil || sec.Project != "p1" || !bytes.Equal(sec.Payload, pooled) {
		t.Fatalf("the new secret: %v %+v", err, sec)
	}
	if s := w.agentSecret(t, w.a, onA); s.SecretRef != wr.SecretRef || !bytes.Equal(s.Payload, pooled) {
		t.Errorf("the secret after the rekey: %+v", s)
	}
	if _, op := w.operatorView(t, onA); op.SecretRef != wr.SecretRef {
		t.Errorf("the operator's view after the rekey: %+v", op)
	}

	rep := api.AgentReport{Incarnation: cur.Incarnation, Generation: wr.Generation, Phase: "active",
		EKs: []api.AgentEK{{Kind: "rsa", Handle: 0x81010001, Public: publicDER(t, p256(t))}}, Event: api.AgentEvent{Action: "manufactured"}}
	var made api.AgentWritten
	if code := w.do(t, w.a, "PUT", "/v1/agent/vtpms/"+onA, rep, &made); code != 200 {
		t.Fatalf("report: %d", code)
	}
	rekey.Generation = made.Generation
	code = w.do(t, w.a, "POST", "/v1/agent/vtpms/"+onA+"/rekey", rekey, &e)
	refused(t, "rekeying a manufactured vTPM", code, e, 409, api.CodeConflict)
	if s := w.agentSecret(t, w.a, onA); s.SecretRef != wr.SecretRef {
		t.Errorf("a refused rekey changed the secret: %+v", s)
	}
}

// The secret route releases the key manager's secret of a vTPM that is
// to run, never to be cached, and refuses it for one stopped.
func TestAgentSecret(t *testing.T) {
	w := newAgentHosts(t)
	v := w.create(t, onA, crb, "ha")
	want, err := w.keys.Get(context.Background(), v.SecretRef)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{"", "?incarnation=" + v.Incarnation} {
		resp, err := w.a.Get(w.srv.URL + "/v1/agent/vtpms/" + onA + "/secret" + q)
		if err != nil {
			t.Fatal(err)
		}
		var s api.AgentSecret
		if err := jsonDecode(resp, &s); err != nil || resp.StatusCode != 200 || s.SecretRef != v.SecretRef || !bytes.Equal(s.Payload, want.Payload) {
			t.Fatalf("secret%s: %d %v, ref %s", q, resp.StatusCode, err, s.SecretRef)
		}
		if cc := resp.Header.Get("Cache-Control"); cc != "no-store" {
			t.Errorf("secret%s: Cache-Control %q", q, cc)
		}
	}
	var e api.ErrorBody
	code := w.do(t, w.a, "GET", "/v1/agent/vtpms/"+onA+"/secret?incarnation=another", nil, &e)
	refused(t, "another incarnation's secret", code, e, 404, api.CodeNotFound)
	code = w.do(t, w.a, "GET", "/v1/agent/vtpms/"+onAToo+"/secret", nil, &e)
	refused(t, "an unknown vTPM's secret", code, e, 404, api.CodeNotFound)

	if code := w.call(t, "POST", "/v1/vtpms/"+onA+"/stop", "", nil, nil); code != 202 {
		t.Fatalf("stop: %d", code)
	}
	var raw []byte
	code = w.do(t, w.a, "GET", "/v1/agent/vtpms/"+onA+"/secret", nil, &raw)
	if code != 409 || !bytes.Contains(raw, []byte(api.CodeConflict)) || bytes.Contains(raw, []byte("payload")) {
		t.Errorf("the secret of a stopped vTPM: %d %s", code, raw)
	}
}

// An agent removes a vTPM's record only once it is asked to be deleted,
// at the generation it read; the vTPM is then gone for the operator and
// from the host's watch.
func TestAgentDeleted(t *testing.T) {
	w := newAgentHosts(t)
	w.create(t, onA, crb, "ha")
	var ch api.AgentChanges
	w.do(t, w.a, "GET", "/v1/agent/vtpms?since=0", nil, &ch)
	cur := w.read(t, w.a, onA)
	deletion := api.AgentDeletion{Incarnation: cur.Incarnation, Generation: cur.Generation, Event: api.AgentEvent{Action: "deleted", Detail: "state removed"}}
	var e api.ErrorBody
	code := w.do(t, w.a, "POST", "/v1/agent/vtpms/"+onA+"/deleted", deletion, &e)
	refused(t, "deleting a vTPM to run", code, e, 409, api.CodeConflict)

	// The agent acted on it, so the operator's delete waits for the agent.
	var wr api.AgentWritten
	rep := api.AgentReport{Incarnation: cur.Incarnation, Generation: cur.Generation, Phase: "provisioning", Event: api.AgentEvent{Action: "provisioning"}}
	if code := w.do(t, w.a, "PUT", "/v1/agent/vtpms/"+onA, rep, &wr); code != 200 {
		t.Fatalf("report: %d", code)
	}
	var v api.VTPM
	if code := w.call(t, "DELETE", "/v1/vtpms/"+onA, "", nil, &v); code != 202 || v.Desired != "deleted" {
		t.Fatalf("delete: %d %+v", code, v)
	}
	deletion.Generation = wr.Generation // before the delete was asked
	code = w.do(t, w.a, "POST", "/v1/agent/vtpms/"+onA+"/deleted", deletion, &e)
	refused(t, "a stale deletion", code, e, 409, api.CodeConflict)
	if code, _ := w.operatorView(t, onA); code != 200 {
		t.Fatalf("a refused deletion removed the vTPM: %d", code)
	}

	cur = w.read(t, w.a, onA)
	deletion.Generation = cur.Generation
	if code := w.do(t, w.a, "POST", "/v1/agent/vtpms/"+onA+"/deleted", deletion, nil); code != 204 {
		t.Fatalf("deleted: %d", code)
	}
	if code, v := w.operatorView(t, onA); code != 404 {
		t.Fatalf("the vTPM after its agent deleted it: %d %+v", code, v)
	}
	code = w.do(t, w.a, "GET", "/v1/agent/vtpms/"+onA, nil, &e)
	refused(t, "the agent reading it again", code, e, 404, api.CodeNotFound)
	var gone api.AgentChanges
	if code := w.do(t, w.a, "GET", fmt.Sprintf("/v1/agent/vtpms?since=%d", ch.Revision), nil, &gone); code != 200 || gone.Reset ||
		len(gone.VTPMs) != 0 || !slices.Equal(gone.Gone, []api.AgentGone{{InstanceID: onA, Incarnation: cur.Incarnation}}) {
		t.Fatalf("the watch after the deletion: %d %+v", code, gone)
	}
	var evs api.EventList
	w.call(t, "GET", "/v1/vtpms/"+onA+"/events?all=true", "", nil, &evs)
	if n := len(evs.Items); n == 0 || evs.Items[n-1].Actor != "agent:ha" || evs.Items[n-1].Action != "deleted" || evs.Items[n-1].Detail != "state removed" {
		t.Errorf("the instance's events: %+v", evs.Items)
	}
}

// The deployment CA certifies the EKs of vTPMs a host manufactures, for
// its pool or for a vTPM placed on it: the certificate chains to GET
// /v1/ca and has the TCG EK profile. Keys no EK template makes, and TPM
// versions that do not exist, are refused.
func TestAgentEKCertificates(t *testing.T) {
	w := newAgentHosts(t)
	w.create(t, onA, crb, "ha")
	var chain []byte
	if code := w.call(t, "GET", "/v1/ca", "", nil, &chain); code != 200 {
		t.Fatalf("ca: %d", code)
	}
	block, _ := pem.Decode(chain)
	if block == nil {
		t.Fatalf("GET /v1/ca: %q", chain)
	}
	root, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	ecKey := p256(t)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		key  crypto.Signer
		req  api.EKCertificateRequest
	}{
		{"ECDSA P-256, TPM 2.0, for the pool", ecKey, api.EKCertificateRequest{TPMVersion: "2.0"}},
		{"RSA-2048, TPM 1.2, for the pool", rsaKey, api.EKCertificateRequest{TPMVersion: "1.2"}},
		{"RSA-2048, TPM 2.0, for a vTPM on the host", rsaKey, api.EKCertificateRequest{InstanceID: onA, TPMVersion: "2.0"}},
	} {
		c.req.Public = publicDER(t, c.key)
		var issued api.IssuedEKCertificate
		if code := w.do(t, w.a, "POST", "/v1/agent/ek-certificates", c.req, &issued); code != 200 {
			t.Fatalf("%s: %d", c.name, code)
		}
		cert, profile, err := ca.ParseEK(issued.Certificate)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: w.clock.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("%s: does not chain to GET /v1/ca: %v", c.name, err)
		}
		if !bytes.Equal(cert.RawIssuer, root.RawSubject) || !bytes.Equal(root.Raw, w.deploymentCA.Certificate().Raw) {
			t.Errorf("%s: issuer %s, want the deployment CA %s", c.name, cert.Issuer, root.Subject)
		}
		if !slices.ContainsFunc(cert.UnknownExtKeyUsage, asn1.ObjectIdentifier{2, 23, 133, 8, 1}.Equal) {
			t.Errorf("%s: no tcg-kp-EKCertificate extended key usage: %v", c.name, cert.UnknownExtKeyUsage)
		}
		if !c.key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(cert.PublicKey) || cert.IsCA ||
			profile.TPMVersion != c.req.TPMVersion || profile.Model != "swtpm" {
			t.Errorf("%s: key, CA flag or profile: %+v", c.name, profile)
		}
	}

	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	for _, c := range []struct {
		name   string
		req    api.EKCertificateRequest
		status int
		code   api.Code
	}{
		{"garbage public", api.EKCertificateRequest{TPMVersion: "2.0", Public: []byte("not a key")}, 400, api.CodeInvalidParameter},
		{"no public", api.EKCertificateRequest{TPMVersion: "2.0"}, 400, api.CodeInvalidParameter},
		{"TPM 3.0", api.EKCertificateRequest{TPMVersion: "3.0", Public: publicDER(t, ecKey)}, 400, api.CodeInvalidTPMVersion},
		{"no TPM version", api.EKCertificateRequest{Public: publicDER(t, ecKey)}, 400, api.CodeInvalidTPMVersion},
		{"P-224", api.EKCertificateRequest{TPMVersion: "2.0", Public: publicDER(t, p224)}, 400, api.CodeInvalidParameter},
		{"ECDSA for TPM 1.2", api.EKCertificateRequest{TPMVersion: "1.2", Public: publicDER(t, ecKey)}, 400, api.CodeInvalidParameter},
		{"an unknown vTPM", api.EKCertificateRequest{InstanceID: onAToo, TPMVersion: "2.0", Public: publicDER(t, ecKey)}, 404, api.CodeNotFound},
	} {
		var e api.ErrorBody
		code := w.do(t, w.a, "POST", "/v1/agent/ek-certificates", c.req, &e)
		refused(t, c.name, code, e, c.status, c.code)
	}

	// Once a vTPM's EKs are recorded, its host gets no more certificates
	// for it.
	v := w.read(t, w.a, onA)
	report := api.AgentReport{Incarnation: v.Incarnation, Generation: v.Generation, Phase: "active",
		EKs: []api.AgentEK{{Kind: "rsa2048", Handle: 0x81010001, Public: publicDER(t, rsaKey)}}}
	if code := w.do(t, w.a, "PUT", "/v1/agent/vtpms/"+onA, report, nil); code != 200 {
		t.Fatalf("report: %d", code)
	}
	var e api.ErrorBody
	code := w.do(t, w.a, "POST", "/v1/agent/ek-certificates", api.EKCertificateRequest{InstanceID: onA, TPMVersion: "2.0", Public: publicDER(t, ecKey)}, &e)
	refused(t, "a certificate for a manufactured vTPM", code, e, 409, api.CodeConflict)
}

// hostRequest is a request on route r of the agent protocol, on vTPM id,
// with body (nil: none).
func (w *agentHosts) hostRequest(t *testing.T, host *http.Client, r route, id string, body string) (int, api.ErrorBody) {
	t.Helper()
	method, path, _ := strings.Cut(r.pattern, " ")
	path = strings.ReplaceAll(path, "{id}", id)
	if path == "/v1/agent/vtpms" {
		path += "?wait=0s"
	}
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, _ := http.NewRequest(method, w.srv.URL+path, rd)
	resp, err := host.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var e api.ErrorBody
	jsonDecode(resp, &e)
	return resp.StatusCode, e
}

// hostRoutes are the routes of hosts' agents.
func hostRoutes(t *testing.T, s *Server) []route {
	t.Helper()
	var out []route
	for _, r := range s.routes() {
		if r.access == hosts {
			out = append(out, r)
		}
	}
	if len(out) < 9 {
		t.Fatalf("only %d hosts' routes", len(out))
	}
	return out
}

// Once its host is revoked, an agent's certificate opens none of the
// agent protocol's routes, at once.
func TestAgentRevokedHost(t *testing.T) {
	w := newAgentHosts(t)
	w.create(t, onA, crb, "ha")
	if code := w.do(t, w.a, "GET", "/v1/agent/vtpms/"+onA, nil, nil); code != 200 {
		t.Fatalf("before the revocation: %d", code)
	}
	if code := w.call(t, "POST", "/v1/hosts/ha/revoke", "", nil, nil); code != 200 {
		t.Fatalf("revoke: %d", code)
	}
	for _, r := range hostRoutes(t, w.api) {
		body := ""
		if r.body == jsonBody {
			body = `{}`
		}
		code, e := w.hostRequest(t, w.a, r, onA, body)
		refused(t, r.pattern+" with a revoked certificate", code, e, 401, api.CodeInvalidHostCertificate)
	}
	if code := w.do(t, w.b, "GET", "/v1/agent/vtpms?wait=0s", nil, nil); code != 200 {
		t.Errorf("another host after the revocation: %d", code)
	}
}

// Every agent route that takes a body refuses one that is not exactly one
// JSON value of its type (400 invalid_json), and changes nothing.
func TestAgentRoutesRefuseBadJSON(t *testing.T) {
	w := newAgentHosts(t)
	w.create(t, onA, crb, "ha")
	before := w.read(t, w.a, onA)
	host := w.hostNamed(t, "ha")
	var checked int
	for _, r := range hostRoutes(t, w.api) {
		if r.body != jsonBody {
			continue
		}
		checked++
		for _, body := range []string{`{`, `[]`, `{"bogus":1}`, `{} {}`, `"x"`} {
			code, e := w.hostRequest(t, w.a, r, onA, body)
			refused(t, r.pattern+" with "+body, code, e, 400, api.CodeInvalidJSON)
		}
	}
	if checked != 11 { // heartbeat, renew, host, report, deleted, rekey, resized, EK certificates, drift, adoption, transfer
		t.Errorf("%d hosts' routes take bodies, want 10", checked)
	}
	if after := w.read(t, w.a, onA); !reflect.DeepEqual(after, before) {
		t.Errorf("the record after bad bodies: %+v\nwas %+v", after, before)
	}
	if after := w.hostNamed(t, "ha"); !reflect.DeepEqual(after, host) {
		t.Errorf("the host after bad bodies: %+v\nwas %+v", after, host)
	}
}

// TestAgentTakesTransfer: a host's agent takes a transfer request its
// watch carried (204), and its watch carries it no more while the same run
// is registered, the request still answerable; another host's request, an
// unknown one and an answered one are 404 and change nothing; the run
// registered after (the agent restarted) is carried it again. A run name
// over 64 bytes is refused.
func TestAgentTakesTransfer(t *testing.T) {
	w := newAgentHosts(t)
	ctx := context.Background()
	register := func(c *http.Client, run string) int {
		caps := spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V20}, Models: []spec.Model{spec.CRB}}
		return w.do(t, c, "PUT", "/v1/agent/host", api.AgentHost{Traits: spec.HostTraits(caps).List(), Capacity: 4, Backend: "swtpm",
			Version: "test", Run: run}, nil)
	}
	if code := register(w.a, "run-1"); code != 204 {
		t.Fatalf("register ha with a run: %d", code)
	}
	var e api.ErrorBody
	refused(t, "a long run", w.do(t, w.a, "PUT", "/v1/agent/host", api.AgentHost{Capacity: 4, Backend: "swtpm", Run: strings.Repeat("r", 65)}, &e),
		e, 400, api.CodeInvalidParameter)

	var onHA, onHB, answered store.Transfer
	err := w.store.Update(ctx, func(tx *store.Tx) error {
		onHA = store.Transfer{Host: "ha", InstanceID: onA, Incarnation: "a", Kind: store.TransferSend}
		onHB = store.Transfer{Host: "hb", InstanceID: onB, Incarnation: "b", Kind: store.TransferExport, Generation: 1}
		answered = store.Transfer{Host: "ha", InstanceID: onAToo, Incarnation: "c", Kind: store.TransferDiscard}
		for _, x := range []*store.Transfer{&onHA, &onHB, &answered} {
			if err := tx.AskTransfer(x); err != nil {
				return err
			}
		}
		return tx.AnswerTransfer("ha", answered.ID, nil, "", "")
	})
	if err != nil {
		t.Fatal(err)
	}
	carried := func(c *http.Client) (ids []string) {
		t.Helper()
		var ch api.AgentChanges
		if code := w.do(t, c, "GET", "/v1/agent/vtpms?since=0&wait=0s", nil, &ch); code != 200 {
			t.Fatalf("watch: %d", code)
		}
		for _, x := range ch.Transfers {
			ids = append(ids, x.ID)
		}
		return ids
	}
	if got := carried(w.a); !slices.Equal(got, []string{onHA.ID}) {
		t.Fatalf("ha's watch carries %v, want %v", got, []string{onHA.ID})
	}
	take := func(c *http.Client, id string) (int, api.ErrorBody) {
		var e api.ErrorBody
		return w.do(t, c, "POST", "/v1/agent/transfers/"+id+"/take", nil, &e), e
	}
	for _, id := range []string{onHB.ID, answered.ID, "0123456789abcdef0123456789abcdef"} {
		code, e := take(w.a, id)
		refused(t, "ha taking request "+id, code, e, 404, api.CodeNotFound)
	}
	for range 2 {
		if code, e := take(w.a, onHA.ID); code != 204 {
			t.Fatalf("ha taking its request: %d %+v", code, e)
		}
	}
	if got := carried(w.a); len(got) != 0 {
		t.Fatalf("ha's watch carries %v after ha took it", got)
	}
	if got := carried(w.b); !slices.Equal(got, []string{onHB.ID}) {
		t.Fatalf("hb's watch carries %v, want its own request alone", got)
	}
	var x *store.Transfer
	if err := w.store.View(ctx, func(tx *store.Tx) (err error) { x, err = tx.GetTransfer("hb", onHB.ID); return err }); err != nil {
		t.Fatal(err)
	}
	if x.TakenBy != "" {
		t.Fatalf("hb's request, which ha tried to take, reads taken by %q", x.TakenBy)
	}

	// The agent restarts as another run: it is carried the request again.
	if code := register(w.a, "run-2"); code != 204 {
		t.Fatalf("register ha's next run: %d", code)
	}
	if got := carried(w.a); !slices.Equal(got, []string{onHA.ID}) {
		t.Fatalf("ha's next run is carried %v, want %v", got, []string{onHA.ID})
	}
	if code := w.do(t, w.a, "PUT", "/v1/agent/transfers/"+onHA.ID, api.AgentTransfer{}, nil); code != 204 {
		t.Fatalf("answering the request taken: %d", code)
	}
	if code, e := take(w.a, onHA.ID); code != 404 {
		t.Fatalf("taking an answered request: %d %+v", code, e)
	}
}
