// Package server is vtpmd's REST API under /v1, the HTTP front of the
// domain packages: for each route it authenticates and authorizes the
// caller (auth.go, routes), decodes the request, calls the domain
// (internal/vtpms, internal/verifier, internal/secrets) and encodes the
// answer. Handlers return errors; toAPIError is the one place that turns
// them into responses.
package server

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/broker"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/console"
	"github.com/vtpmd/vtpmd/internal/enrol"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/secrets"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
)

// Request bodies are bounded per route: maxBody for most, whose real
// requests are a few hundred bytes; maxPolicyBody for a named policy, room
// for an allowlist of some 60,000 digests; maxEvidenceBody for evidence,
// room for a whole IMA log of attest.MaxIMALog in base64 besides the
// event log.
const (
	maxBody         = 64 << 10
	maxPolicyBody   = 4 << 20
	maxEvidenceBody = 16 << 20
)

var _ verifier.VTPMs = (*vtpms.Service)(nil)

// Server is the API over the domain packages.
type Server struct {
	VTPMs    *vtpms.Service
	Verifier *verifier.Verifier
	Secrets  *secrets.Service
	// Broker keeps the secrets released to attested instances.
	Broker *broker.Service
	// Enrolment issues join tokens, enrols hosts and authenticates their
	// agents' certificates.
	Enrolment *enrol.Service
	// Agents are the control plane as hosts' agents see it: the agent
	// protocol's routes answer from it.
	Agents *agentstore.Records
	// EKCA is the deployment CA, which certifies vTPMs' EKs.
	EKCA *ca.CA
	// CAChainPEM returns the deployment CA chain.
	CAChainPEM func() []byte
	Log        *slog.Logger
	// StoreStats counts what the store has done, for the metrics
	// vtpmd_store_statements_total and vtpmd_store_retries_total; nil
	// leaves them out.
	StoreStats StoreStats
	// Registry receives the API's metrics; nil: a private one.
	Registry *prometheus.Registry
	// Readiness are what GET /readyz checks, in order; none: always ready.
	Readiness []ReadinessCheck
	// Identity authenticates tenants and the operator by Keystone token
	// (X-Auth-Token) besides client certificates; nil: certificates and
	// the local socket only.
	Identity *Identity
	// Console is the web console, served at /ui/; nil for none.
	Console *console.Console

	end     context.Context // see ending
	endAll  context.CancelFunc
	endOnce sync.Once
}

// Handler returns the API's HTTP handler.
func (s *Server) Handler() http.Handler {
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
	if s.Registry == nil {
		s.Registry = prometheus.NewRegistry()
		s.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	var logs func() attest.LogCacheStats
	if s.Verifier != nil {
		logs = s.Verifier.LogCacheStats
	}
	m := newMetrics(s.Registry, s.VTPMs.Phases, s.VTPMs.TransfersSwept, s.StoreStats, logs)
	mux := http.NewServeMux()
	for _, r := range s.routes() {
		mux.Handle(r.pattern, m.instrument(r.pattern, s.handle(r)))
	}
	if s.Console != nil {
		mux.Handle("/ui/", s.Console.Handler())
	}
	scrape := m.handler()
	mux.Handle("GET /metrics", s.handle(route{"GET /metrics", func(w http.ResponseWriter, r *http.Request) error {
		scrape.ServeHTTP(w, r)
		return nil
	}, operator, noBody}))
	return unrouted(mux)
}

type route struct {
	pattern string
	h       func(http.ResponseWriter, *http.Request) error
	access  access
	body    payload
}

// payload says whether a route takes a request body.
type payload bool

const (
	noBody   payload = false // a body is refused (see admit)
	jsonBody payload = true  // the handler decodes one
)

// routes lists every endpoint; the OpenAPI test checks the document
// against this list.
func (s *Server) routes() []route {
	return []route{
		{"GET /healthz", s.healthz, anyone, noBody},
		{"GET /readyz", s.readyz, anyone, noBody},
		{"GET /v1/openapi.json", s.openapi, anyone, noBody},
		{"POST /v1/resolve", s.resolve, callers, jsonBody},
		{"POST /v1/vtpms", s.createVTPM, callers, jsonBody},
		{"GET /v1/vtpms", s.listVTPMs, callers, noBody},
		{"GET /v1/vtpms/{id}", s.getVTPM, callers, noBody},
		{"DELETE /v1/vtpms/{id}", s.deleteVTPM, callers, noBody},
		{"POST /v1/vtpms/{id}/start", s.startVTPM, callers, noBody},
		{"POST /v1/vtpms/{id}/stop", s.stopVTPM, callers, noBody},
		{"POST /v1/vtpms/{id}/attach", s.attachVTPM, callers, jsonBody},
		{"POST /v1/vtpms/{id}/detach", s.detachVTPM, callers, noBody},
		{"POST /v1/vtpms/{id}/adopt", s.adoptVTPM, operator, jsonBody},
		{"POST /v1/vtpms/{id}/backups", s.createBackup, operator, noBody},
		{"GET /v1/vtpms/{id}/backups", s.listBackups, operator, noBody},
		{"POST /v1/vtpms/{id}/backups/restore", s.restoreBackup, operator, jsonBody},
		{"POST /v1/vtpms/{id}/resize", s.resizeVTPM, callers, jsonBody},
		{"POST /v1/vtpms/{id}/resize/confirm", s.confirmResize, callers, noBody},
		{"POST /v1/vtpms/{id}/resize/revert", s.revertResize, callers, noBody},
		{"POST /v1/vtpms/{id}/migrate", s.migrateVTPM, operator, jsonBody},
		{"POST /v1/vtpms/{id}/live-migrate", s.liveMigrateVTPM, operator, jsonBody},
		{"POST /v1/vtpms/{id}/shelve", s.shelveVTPM, callers, noBody},
		{"POST /v1/vtpms/{id}/unshelve", s.unshelveVTPM, callers, jsonBody},
		{"GET /v1/vtpms/{id}/identity", s.identity, callers, noBody},
		{"GET /v1/vtpms/{id}/attestation", s.getAttestation, callers, noBody},
		{"POST /v1/vtpms/{id}/attestation/register", s.register, agents, jsonBody},
		{"POST /v1/vtpms/{id}/attestation/activate", s.activate, agents, jsonBody},
		{"POST /v1/vtpms/{id}/attestation/nonce", s.nonce, agents, noBody},
		{"POST /v1/vtpms/{id}/attestation/evidence", s.evidence, agents, jsonBody},
		{"POST /v1/vtpms/{id}/attestation/policy", s.setPolicy, callers, jsonBody},
		{"GET /v1/vtpms/{id}/attestation/token", s.token, callers, noBody},
		{"GET /v1/vtpms/{id}/attestation/history", s.history, callers, noBody},
		{"POST /v1/vtpms/{id}/attestation/refresh", s.requestRefresh, callers, noBody},
		{"GET /v1/vtpms/{id}/attestation/refresh", s.awaitRefresh, agents, noBody},
		{"GET /.well-known/vtpmd/jwks.json", s.jwks, anyone, noBody},
		{"GET /v1/vtpms/{id}/events", s.events, callers, noBody},
		{"GET /v1/vtpms/{id}/hyperv/plan", s.hypervPlan, callers, noBody},
		{"POST /v1/vtpms/{id}/secrets/{secret}/release", s.releaseSecret, agents, noBody},
		{"POST /v1/broker/secrets", s.createBrokerSecret, callers, jsonBody},
		{"GET /v1/broker/secrets", s.listBrokerSecrets, callers, noBody},
		{"GET /v1/broker/secrets/{name}", s.getBrokerSecret, callers, noBody},
		{"DELETE /v1/broker/secrets/{name}", s.deleteBrokerSecret, callers, noBody},
		{"POST /v1/secrets", s.createSecret, callers, jsonBody},
		{"GET /v1/secrets/{id}", s.getSecret, callers, noBody},
		{"GET /v1/secrets/{id}/payload", s.secretPayload, agents, noBody},
		{"POST /v1/hosts/{name}/credentials", s.hostCredential, operator, noBody},
		{"POST /v1/policies", s.createPolicy, callers, jsonBody},
		{"GET /v1/policies", s.listPolicies, callers, noBody},
		{"GET /v1/policies/{name}", s.getPolicy, callers, noBody},
		{"DELETE /v1/policies/{name}", s.deletePolicy, callers, noBody},
		{"GET /v1/hosts", s.listHosts, operator, noBody},
		{"GET /v1/hosts/{name}", s.getHost, operator, noBody},
		{"POST /v1/hosts/{name}/drain", s.drainHost, operator, noBody},
		{"POST /v1/hosts/{name}/undrain", s.undrainHost, operator, noBody},
		{"POST /v1/hosts/{name}/evacuate", s.evacuateHost, operator, jsonBody},
		{"POST /v1/hosts/{name}/evacuate-live", s.evacuateHostLive, operator, jsonBody},
		{"GET /v1/hosts/{name}/drift", s.drift, operator, noBody},
		{"GET /v1/hosts/{name}/attestation", s.getAttestation, operator, noBody},
		{"DELETE /v1/hosts/{name}/attestation", s.forgetHost, operator, noBody},
		{"GET /v1/hosts/{name}/attestation/history", s.history, operator, noBody},
		{"POST /v1/hosts/{name}/attestation/refresh", s.requestRefresh, operator, noBody},
		{"GET /v1/hosts/{name}/attestation/refresh", s.awaitRefresh, agents, noBody},
		{"POST /v1/hosts/{name}/attestation/register", s.register, agents, jsonBody},
		{"POST /v1/hosts/{name}/attestation/activate", s.activate, agents, jsonBody},
		{"POST /v1/hosts/{name}/attestation/nonce", s.nonce, agents, noBody},
		{"POST /v1/hosts/{name}/attestation/evidence", s.evidence, agents, jsonBody},
		{"POST /v1/hosts/{name}/attestation/policy", s.setPolicy, operator, jsonBody},
		{"POST /v1/hosts/{name}/drift/repair", s.repairDrift, operator, noBody},
		{"POST /v1/hosts/{name}/join-tokens", s.joinToken, operator, noBody},
		{"POST /v1/hosts/{name}/revoke", s.revokeHost, operator, noBody},
		{"POST /v1/agent/enroll", s.enroll, agents, jsonBody},
		{"POST /v1/agent/heartbeat", s.heartbeat, hosts, jsonBody},
		{"POST /v1/agent/renew", s.renew, hosts, jsonBody},
		{"PUT /v1/agent/host", s.registerHost, hosts, jsonBody},
		{"GET /v1/agent/vtpms", s.watchVTPMs, hosts, noBody},
		{"GET /v1/agent/vtpms/{id}", s.agentGetVTPM, hosts, noBody},
		{"PUT /v1/agent/vtpms/{id}", s.reportVTPM, hosts, jsonBody},
		{"POST /v1/agent/vtpms/{id}/deleted", s.vtpmDeleted, hosts, jsonBody},
		{"GET /v1/agent/vtpms/{id}/secret", s.vtpmSecret, hosts, noBody},
		{"POST /v1/agent/vtpms/{id}/rekey", s.rekeyVTPM, hosts, jsonBody},
		{"POST /v1/agent/vtpms/{id}/resized", s.vtpmResized, hosts, jsonBody},
		{"POST /v1/agent/ek-certificates", s.certifyEK, hosts, jsonBody},
		{"PUT /v1/agent/drift", s.reportDrift, hosts, jsonBody},
		{"GET /v1/agent/adoptions/{id}/secret", s.adoptionSecret, hosts, noBody},
		{"PUT /v1/agent/adoptions/{id}", s.answerAdoption, hosts, jsonBody},
		{"GET /v1/agent/transfers/{id}", s.transferInput, hosts, noBody},
		{"PUT /v1/agent/transfers/{id}", s.answerTransfer, hosts, jsonBody},
		{"POST /v1/agent/transfers/{id}/take", s.takeTransfer, hosts, noBody},
		{"GET /v1/ca", s.caChain, anyone, noBody},
		{"POST /v1/console/links", s.consoleLink, operator, noBody},
		{"DELETE /v1/console/sessions", s.endConsoleSessions, operator, noBody},
	}
}

func (s *Server) handle(rt route) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r, err := s.admit(r, rt)
		if err == nil {
			err = rt.h(w, r)
		}
		if err != nil && r.Context().Err() != nil {
			// The client went away (an agent's watch as the agent stops):
			// there is no one to answer, and nothing went wrong here.
			s.Log.Debug("request ended by its client", "method", r.Method, "path", r.URL.Path, "err", err)
			return
		}
		if err != nil {
			writeError(w, toAPIError(err, s.Log, r))
		}
	})
}

// admit checks, before a route's handler runs, what its row in routes
// asks: an authenticated caller for callers' and the operator's routes,
// the operator itself (not a project, nor the operator scoped to one) for
// the operator's, an enrolled host's certificate for hosts', and no body
// where the route takes none. It returns the request with its caller or
// host.
func (s *Server) admit(r *http.Request, rt route) (*http.Request, error) {
	if rt.access == hosts {
		var err error
		if r, err = s.hostOf(r); err != nil {
			return r, err
		}
	}
	if rt.access == callers || rt.access == operator {
		var err error
		if r, err = s.authenticate(r); err != nil {
			return r, err
		}
	}
	if rt.access == operator {
		scope, err := project(r)
		if err != nil {
			return r, err
		}
		if c, _ := callerOf(r); !c.operator || scope != "" {
			return r, refusal.Forbidden(api.CodeForbidden, rt.operatorsBecause())
		}
	}
	if rt.access == callers || rt.access == operator {
		if c := scopedCaller(r); c.rights&rt.needs() == 0 {
			return r, refusal.Forbidden(api.CodeForbidden, rt.deniedBecause(c))
		}
	}
	if rt.body == noBody && hasBody(r) {
		return r, refusal.Invalid(api.CodeInvalidJSON, "This endpoint takes no request body.")
	}
	return r, nil
}

// deniedBecause is why caller c, known, may not call rt.
func (rt route) deniedBecause(c caller) string {
	switch {
	case rt.needs() == createsVTPMs && c.rights&changes != 0:
		return "vTPMs are created by the cloud, which knows whose instance is whose: the operator creates one, naming its project in \"project\", or, with Keystone authentication, a member of the project. A project's client certificate cannot."
	case c.rights == 0:
		return "The Keystone token carries no role vtpmd knows: reader reads a project's vTPMs, member also creates and changes them, admin (system scope or the admin project) is the operator."
	}
	return "The Keystone role reader only reads; this needs member (or admin)."
}

// operatorsBecause is why only the operator may call rt.
func (rt route) operatorsBecause() string {
	_, path, _ := strings.Cut(rt.pattern, " ")
	switch {
	case strings.HasPrefix(path, "/v1/hosts"):
		return "Hosts are the operator's; a project sees its instance's host in the vTPM record."
	case path == "/metrics":
		return "Metrics are the operator's: they count every project's vTPMs."
	}
	return "This is the operator's."
}

// hasBody says whether r came with a body, reading at most one byte of it.
func hasBody(r *http.Request) bool {
	if r.ContentLength > 0 {
		return true
	}
	var b [1]byte
	n, _ := io.ReadFull(r.Body, b[:])
	return n > 0
}

// unrouted answers what mux cannot route with the API's JSON error, where
// the mux itself answers in plain text: 404 for a path no route has, 405
// with Allow for a method the path does not take.
func unrouted(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h, pattern := mux.Handler(r)
		if pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		// The mux's answer, kept to learn its status and Allow.
		probe := &statusOnly{header: http.Header{}}
		h.ServeHTTP(probe, r)
		switch probe.status {
		case http.StatusNotFound:
			writeError(w, &APIError{http.StatusNotFound, api.CodeNotFound, "No such endpoint; GET /v1/openapi.json lists them."})
		case http.StatusMethodNotAllowed:
			allow := probe.header.Get("Allow")
			w.Header().Set("Allow", allow)
			writeError(w, &APIError{http.StatusMethodNotAllowed, api.CodeMethodNotAllowed, "This path takes " + allow + ", not " + refusal.Quote(r.Method) + "."})
		default: // a redirect to the canonical path
			mux.ServeHTTP(w, r)
		}
	})
}

// statusOnly is a ResponseWriter that keeps the status and headers and
// drops the body.
type statusOnly struct {
	header http.Header
	status int
}

func (p *statusOnly) Header() http.Header         { return p.header }
func (p *statusOnly) Write(b []byte) (int, error) { return len(b), nil }
func (p *statusOnly) WriteHeader(status int)      { p.status = status }

// healthz answers ok while the process serves HTTP: a liveness check,
// which touches nothing else (a replica whose database is gone is alive,
// only not ready).
func (s *Server) healthz(w http.ResponseWriter, r *http.Request) error {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	return nil
}

// ReadinessCheck is one of Server.Readiness: it returns nil when what it
// checks is ready, else an error whose message a caller may read (it must
// reveal no secret or address; the check logs details itself).
type ReadinessCheck struct {
	Name  string
	Check func(context.Context) error
}

// readyz runs every readiness check: 200 when all pass, else 503; the body
// names each check and why it failed.
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) error {
	out := api.Readiness{Ready: true, Checks: []api.ReadinessCheck{}}
	for _, c := range s.Readiness {
		res := api.ReadinessCheck{Name: c.Name, Ready: true}
		if err := c.Check(r.Context()); err != nil {
			res.Ready, res.Message, out.Ready = false, err.Error(), false
		}
		out.Checks = append(out.Checks, res)
	}
	status := http.StatusOK
	if !out.Ready {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, out)
	return nil
}

// decode reads a JSON body strictly: at most maxBody bytes, no unknown
// fields, one value.
func decode(w http.ResponseWriter, r *http.Request, v any) error {
	return decodeUpTo(w, r, v, maxBody)
}

// decodeUpTo is decode for a route whose bodies may take up to limit bytes.
func decodeUpTo(w http.ResponseWriter, r *http.Request, v any, limit int64) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		return refusal.Invalid(api.CodeInvalidJSON, "The request body is not valid JSON for this endpoint: "+err.Error())
	}
	if _, err := dec.Token(); err != io.EOF {
		return refusal.Invalid(api.CodeInvalidJSON, "The request body holds more than one JSON value.")
	}
	return nil
}

func (s *Server) resolve(w http.ResponseWriter, r *http.Request) error {
	var req api.ResolveRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	sp, err := s.VTPMs.Resolve(req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, spec.Resolution(sp))
	return nil
}

// createVTPM is the operator's (see routes): the cloud creates a vTPM for
// an instance it knows is the project's. A project that could would also
// squat other projects' future instance ids, and learn which ids exist.
func (s *Server) createVTPM(w http.ResponseWriter, r *http.Request) error {
	var req api.CreateVTPMRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	v, err := s.VTPMs.Create(r.Context(), c, req)
	if err != nil {
		return err
	}
	w.Header().Set("Location", "/v1/vtpms/"+v.InstanceID)
	writeJSON(w, http.StatusAccepted, vtpmView(v))
	return nil
}

// adoptVTPM takes over the vTPM Nova made for an instance (the
// operator's): 201 with the new record, 200 with the record an earlier
// adoption of the same domain made.
func (s *Server) adoptVTPM(w http.ResponseWriter, r *http.Request) error {
	var req api.AdoptRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	v, made, err := s.VTPMs.Adopt(r.Context(), c, r.PathValue("id"), req)
	if err != nil {
		return err
	}
	status := http.StatusOK
	if made {
		status = http.StatusCreated
		w.Header().Set("Location", "/v1/vtpms/"+v.InstanceID)
	}
	writeJSON(w, status, vtpmView(v))
	return nil
}

func (s *Server) listVTPMs(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	q := r.URL.Query()
	f := store.Filter{Project: q.Get("project"), Host: q.Get("host"), Phase: store.Phase(q.Get("phase")), After: q.Get("after"), Limit: 100}
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > 1000 {
			return refusal.Invalid(api.CodeInvalidParameter, "limit must be a whole number from 1 to 1000.")
		}
		f.Limit = n
	}
	switch f.Phase {
	case "", store.PhasePending, store.PhaseProvisioning, store.PhaseActive, store.PhaseStopped, store.PhaseDeleting, store.PhaseError,
		store.PhaseShelving, store.PhaseShelved, store.PhaseUnshelving:
	default:
		return refusal.Invalid(api.CodeInvalidParameter, "phase must be one of pending, provisioning, active, stopped, shelving, shelved, unshelving, deleting, error.")
	}
	page, next, err := s.VTPMs.List(r.Context(), c, f)
	if err != nil {
		return err
	}
	out := api.VTPMList{Items: []api.VTPM{}, Next: next}
	for _, v := range page {
		out.Items = append(out.Items, vtpmView(v))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// deleteVTPM answers 202 while the host's agent deletes the vTPM, or 200
// (phase deleted) when no agent had acted on it and it went at once; the
// secret is shredded either way (vtpms.Service.Delete).
func (s *Server) deleteVTPM(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	v, gone, err := s.VTPMs.Delete(r.Context(), c, r.PathValue("id"))
	if err != nil {
		return err
	}
	if gone {
		view := vtpmView(v)
		view.Desired, view.Phase = string(store.DesiredDeleted), "deleted"
		writeJSON(w, http.StatusOK, view)
		return nil
	}
	writeJSON(w, http.StatusAccepted, vtpmView(v))
	return nil
}

func (s *Server) startVTPM(w http.ResponseWriter, r *http.Request) error {
	return s.change(w, r, s.VTPMs.Start)
}

func (s *Server) stopVTPM(w http.ResponseWriter, r *http.Request) error {
	return s.change(w, r, s.VTPMs.Stop)
}

func (s *Server) detachVTPM(w http.ResponseWriter, r *http.Request) error {
	return s.change(w, r, s.VTPMs.Detach)
}

func (s *Server) attachVTPM(w http.ResponseWriter, r *http.Request) error {
	var req api.AttachRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	return s.change(w, r, func(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
		return s.VTPMs.Attach(ctx, c, id, req.Domain)
	})
}

// resizeVTPM resizes the vTPM the path names to a new flavor and image:
// 202 with the record, which the host's agent carries on from.
func (s *Server) resizeVTPM(w http.ResponseWriter, r *http.Request) error {
	var req api.ResizeRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	return s.change(w, r, func(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
		return s.VTPMs.Resize(ctx, c, id, req)
	})
}

func (s *Server) confirmResize(w http.ResponseWriter, r *http.Request) error {
	return s.change(w, r, s.VTPMs.ConfirmResize)
}

// revertResize answers as a delete does when the revert removed the vTPM
// a resize made at once: 200 with phase deleted.
func (s *Server) revertResize(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	v, gone, err := s.VTPMs.RevertResize(r.Context(), c, r.PathValue("id"))
	if err != nil {
		return err
	}
	view := vtpmView(v)
	if gone {
		view.Phase = "deleted"
		writeJSON(w, http.StatusOK, view)
		return nil
	}
	writeJSON(w, http.StatusAccepted, view)
	return nil
}

// change asks for a change of the vTPM the path names and answers 202
// with the record: the host's agent carries it out.
func (s *Server) change(w http.ResponseWriter, r *http.Request, do func(context.Context, tenant.Caller, string) (*store.VTPM, error)) error {
	return s.answerVTPM(w, r, http.StatusAccepted, do)
}

// answerVTPM does do to the vTPM the path names, as the caller, and
// answers status with the record.
func (s *Server) answerVTPM(w http.ResponseWriter, r *http.Request, status int, do func(context.Context, tenant.Caller, string) (*store.VTPM, error)) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	v, err := do(r.Context(), c, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, status, vtpmView(v))
	return nil
}

func (s *Server) identity(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	v, err := s.VTPMs.Identity(r.Context(), c, r.PathValue("id"))
	if err != nil {
		return err
	}
	id := api.Identity{InstanceID: v.InstanceID, CAChainPEM: string(s.CAChainPEM())}
	for _, ek := range v.EKs {
		e := api.EK{Kind: ek.Kind, Handle: fmt.Sprintf("0x%08x", ek.Handle),
			PublicKeyPEM: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: ek.PublicDER}))}
		if ek.NVIndex != 0 {
			e.NVIndex = fmt.Sprintf("0x%08x", ek.NVIndex)
		}
		if len(ek.CertDER) > 0 {
			e.CertificatePEM = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ek.CertDER}))
		}
		id.EKs = append(id.EKs, e)
	}
	writeJSON(w, http.StatusOK, id)
	return nil
}

// events is a vTPM's audit log. With ?all=true the operator (not scoped to
// a project) reads every vTPM the instance id has had, deleted ones
// included, each event naming its incarnation.
func (s *Server) events(w http.ResponseWriter, r *http.Request) error {
	all, err := boolParam(r, "all")
	if err != nil {
		return err
	}
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	list := s.VTPMs.Events
	if all {
		list = s.VTPMs.AllEvents
	}
	evs, err := list(r.Context(), c, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, eventList(evs, true))
	return nil
}

// eventList is events as the API shows them, with their incarnations
// when asked.
func eventList(evs []store.Event, incarnations bool) api.EventList {
	out := api.EventList{Items: []api.Event{}}
	for _, e := range evs {
		ev := api.Event{At: e.At, Actor: e.Actor, Action: e.Action, Detail: e.Detail}
		if incarnations {
			ev.Incarnation = e.Incarnation
		}
		out.Items = append(out.Items, ev)
	}
	return out
}

// boolParam reads an optional true/false query parameter.
func boolParam(r *http.Request, name string) (bool, error) {
	raw := r.URL.Query().Get(name)
	if raw == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(raw)
	if err != nil {
		return false, refusal.Invalid(api.CodeInvalidParameter, name+" is true or false.")
	}
	return b, nil
}

func (s *Server) listHosts(w http.ResponseWriter, r *http.Request) error {
	hosts, err := s.VTPMs.Hosts(r.Context(), "")
	if err != nil {
		return err
	}
	out := api.HostList{Items: []api.Host{}}
	for _, h := range hosts {
		out.Items = append(out.Items, hostView(h))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) getHost(w http.ResponseWriter, r *http.Request) error {
	h, err := s.host(r)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, hostView(h))
	return nil
}

// host reads the host the path names.
func (s *Server) host(r *http.Request) (vtpms.Host, error) {
	hosts, err := s.VTPMs.Hosts(r.Context(), r.PathValue("name"))
	if err != nil {
		return vtpms.Host{}, err
	}
	if len(hosts) == 0 {
		return vtpms.Host{}, refusal.NotFound(api.CodeNotFound, "No such host.")
	}
	return hosts[0], nil
}

func (s *Server) drainHost(w http.ResponseWriter, r *http.Request) error {
	return s.setDraining(w, r, true)
}

func (s *Server) undrainHost(w http.ResponseWriter, r *http.Request) error {
	return s.setDraining(w, r, false)
}

// setDraining is the operator's (see routes): it drains or undrains the
// host the path names, and answers with the host.
func (s *Server) setDraining(w http.ResponseWriter, r *http.Request, drain bool) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	h, err := s.VTPMs.Drain(r.Context(), c, r.PathValue("name"), drain)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, hostView(h))
	return nil
}

func hostView(h vtpms.Host) api.Host {
	traits := h.Traits
	if traits == nil {
		traits = []string{}
	}
	return api.Host{Name: h.Name, Backend: h.Backend, State: string(h.State), Draining: h.Draining, Traits: traits,
		Capacity: h.Capacity, Used: h.Used, LastHeartbeat: h.HeartbeatAt, Version: h.Version, Certificates: h.Certificates}
}

func (s *Server) drift(w http.ResponseWriter, r *http.Request) error {
	return s.hostDrift(w, r, false)
}

func (s *Server) repairDrift(w http.ResponseWriter, r *http.Request) error {
	return s.hostDrift(w, r, true)
}

// hostDrift is the operator's (see routes): drift names objects of every
// project.
func (s *Server) hostDrift(w http.ResponseWriter, r *http.Request, repair bool) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	d, err := s.VTPMs.Drift(r.Context(), c, r.PathValue("name"), repair)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, d)
	return nil
}

func (s *Server) caChain(w http.ResponseWriter, r *http.Request) error {
	w.Header().Set("Content-Type", "application/x-pem-file")
	_, err := w.Write(s.CAChainPEM())
	return err
}

func (s *Server) openapi(w http.ResponseWriter, r *http.Request) error {
	w.Header().Set("Content-Type", "application/json")
	_, err := w.Write(api.OpenAPI)
	return err
}

// vtpmView is a record as the API shows it: what was asked, and what the
// host's agent last recorded.
func vtpmView(v *store.VTPM) api.VTPM {
	out := api.VTPM{InstanceID: v.InstanceID, Project: v.Project, Spec: *spec.Resolution(&v.Spec).VTPM,
		Host: v.Host, Desired: string(v.Desired), Phase: string(v.Phase), Reason: v.Reason, SecretRef: v.SecretID,
		Domain: v.Domain, SwtpmPID: v.PID, GuestConnected: v.Connected, Incarnation: v.Incarnation, CreatedAt: v.CreatedAt, UpdatedAt: v.UpdatedAt}
	if v.Sockets.Data != "" {
		out.Sockets = &api.Sockets{Data: v.Sockets.Data, Ctrl: v.Sockets.Ctrl}
	}
	if rz := v.Resize; rz != nil {
		out.Resize = &api.Resize{Status: string(rz.Status), Kind: string(rz.Kind), OldSecretRef: rz.OldSecretID, RequestedAt: rz.RequestedAt}
		if rz.From != nil {
			out.Resize.From = spec.Resolution(rz.From).VTPM
		}
		if rz.To != nil {
			out.Resize.To = spec.Resolution(rz.To).VTPM
		}
	}
	return out
}
