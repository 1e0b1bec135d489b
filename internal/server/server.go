// Package server is vtpmd's REST API under /v1: it validates and resolves
// requests, places vTPMs on hosts and records the desired state that host
// agents carry out. Handlers return errors; toAPIError turns them into
// responses.
package server

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
)

// ProjectHeader scopes a request to one project (tenant): such a caller sees
// and changes only that project's vTPMs. The operator may scope itself to
// any project with it; a tenant may only repeat its own. It names no one:
// who the caller is comes from authenticate.
const ProjectHeader = "X-Project-ID"

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

// Server holds the API's dependencies.
type Server struct {
	Store   *store.Store
	Keyring keyring.Keyring
	// CAChainPEM returns the deployment CA chain.
	CAChainPEM func() []byte
	Options    spec.Options
	// Sockets says where a vTPM on a host is reachable, or nil if unknown.
	Sockets func(host, instanceID string) *api.Sockets
	// Notify tells a host's agent that its desired state changed.
	Notify func(host string)
	// Drift asks a host's agent what differs between its hypervisor and the
	// records, deleting orphans when repair is set; nil when no agent here
	// can tell.
	Drift func(ctx context.Context, host string, repair bool) (*api.Drift, error)
	// HostEKRoots are the CAs (TPM vendors' or the operator's) whose EK
	// certificates a host's own TPM may register with; nil: hosts cannot.
	HostEKRoots *x509.CertPool
	// Verdicts signs attestation verdicts for relying parties; nil: none.
	Verdicts *attest.Signer
	// Webhook is told of every verdict change; nil: none.
	Webhook *Webhook
	// HyperV shapes Hyper-V plans.
	HyperV HyperVOptions
	// StaleAfter is how long a registered instance or host may go without
	// genuine evidence before its verdict turns stale; 0: DefaultStaleAfter.
	StaleAfter time.Duration
	Log        *slog.Logger
	// Registry receives the API's metrics; nil: a private one.
	Registry *prometheus.Registry

	caOnce    sync.Once
	caPool    *x509.CertPool
	ekChecks  sync.Map // [sha256.Size]byte → ekCheck; see checkEK
	refreshes refreshes
	ticketKey []byte        // see ticket
	end       chan struct{} // see ending
	endOnce   sync.Once
	endClose  sync.Once
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
	s.ticketKey = newTicketKey()
	m := newMetrics(s.Registry, s.Store)
	mux := http.NewServeMux()
	for _, r := range s.routes() {
		mux.Handle(r.pattern, m.instrument(r.pattern, s.handle(r)))
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
		{"GET /v1/openapi.json", s.openapi, anyone, noBody},
		{"POST /v1/resolve", s.resolve, callers, jsonBody},
		{"POST /v1/vtpms", s.createVTPM, operator, jsonBody},
		{"GET /v1/vtpms", s.listVTPMs, callers, noBody},
		{"GET /v1/vtpms/{id}", s.getVTPM, callers, noBody},
		{"DELETE /v1/vtpms/{id}", s.deleteVTPM, callers, noBody},
		{"POST /v1/vtpms/{id}/start", s.startVTPM, callers, noBody},
		{"POST /v1/vtpms/{id}/stop", s.stopVTPM, callers, noBody},
		{"POST /v1/vtpms/{id}/attach", s.attachVTPM, callers, jsonBody},
		{"POST /v1/vtpms/{id}/detach", s.detachVTPM, callers, noBody},
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
		{"GET /v1/ca", s.caChain, anyone, noBody},
	}
}

func (s *Server) handle(rt route) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r, err := s.admit(r, rt)
		if err == nil {
			err = rt.h(w, r)
		}
		if err != nil {
			writeError(w, toAPIError(err, s.Log, r))
		}
	})
}

// admit checks, before a route's handler runs, what its row in routes
// asks: an authenticated caller for callers' and the operator's routes,
// the operator itself (not a project, nor the operator scoped to one) for
// the operator's, and no body where the route takes none. It returns the
// request with its caller.
func (s *Server) admit(r *http.Request, rt route) (*http.Request, error) {
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
			return r, apiErr(http.StatusForbidden, CodeForbidden, rt.operatorsBecause())
		}
	}
	if rt.body == noBody && hasBody(r) {
		return r, apiErr(http.StatusBadRequest, CodeInvalidJSON, "This endpoint takes no request body.")
	}
	return r, nil
}

// operatorsBecause is why only the operator may call rt.
func (rt route) operatorsBecause() string {
	_, path, _ := strings.Cut(rt.pattern, " ")
	switch {
	case rt.pattern == "POST /v1/vtpms":
		return "vTPMs are created by the cloud, which knows whose instance is whose: the operator creates one, naming its project in \"project\". A project cannot."
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
			writeError(w, apiErr(http.StatusNotFound, CodeNotFound, "No such endpoint; GET /v1/openapi.json lists them."))
		case http.StatusMethodNotAllowed:
			allow := probe.header.Get("Allow")
			w.Header().Set("Allow", allow)
			writeError(w, apiErr(http.StatusMethodNotAllowed, CodeMethodNotAllowed, "This path takes "+allow+", not "+strconv.Quote(truncate(r.Method))+"."))
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

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) error {
	if err := s.Store.View(r.Context(), func(tx *store.Tx) error { _, err := tx.ListHosts(); return err }); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
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
		return apiErr(http.StatusBadRequest, CodeInvalidJSON, "The request body is not valid JSON for this endpoint: "+err.Error())
	}
	if _, err := dec.Token(); err != io.EOF {
		return apiErr(http.StatusBadRequest, CodeInvalidJSON, "The request body holds more than one JSON value.")
	}
	return nil
}

func (s *Server) resolve(w http.ResponseWriter, r *http.Request) error {
	var req api.ResolveRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	sp, err := spec.Resolve(specRequest(req), s.Options)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, spec.Resolution(sp))
	return nil
}

func specRequest(r api.ResolveRequest) spec.Request {
	return spec.Request{FlavorName: r.FlavorName, FlavorSpecs: r.FlavorSpecs, ImageName: r.ImageName, ImageProps: r.ImageProps}
}

// instanceID validates a path or body instance id: a canonical UUID, so it
// is safe as a directory name and a key. Upper-case hex is accepted and
// lowered.
func instanceID(raw string) (string, error) {
	id, err := uuid.Parse(raw)
	if err != nil || len(raw) != 36 {
		return "", apiErr(http.StatusBadRequest, CodeInvalidInstanceID,
			fmt.Sprintf("Instance id %s is not a UUID of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx.", strconv.Quote(truncate(raw))))
	}
	return id.String(), nil
}

var projectRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// project is the caller's scope: a tenant's project, or the project the
// operator scoped itself to ("" for the operator unscoped). Agents' and
// public routes have no caller, so the header scopes nothing there.
func project(r *http.Request) (string, error) {
	c, ok := callerOf(r)
	if !ok {
		return "", nil
	}
	p := r.Header.Get(ProjectHeader)
	if p != "" && !projectRE.MatchString(p) {
		return "", apiErr(http.StatusBadRequest, CodeInvalidProject, "The "+ProjectHeader+" header is not a valid project id.")
	}
	if !c.operator {
		if p != "" && p != c.project {
			return "", apiErr(http.StatusForbidden, CodeInvalidProject, "The client certificate is for project "+c.project+", not "+p+".")
		}
		return c.project, nil
	}
	return p, nil
}

// owningProject is the project a new resource belongs to: the one asked
// for, else the caller's; required when the operator (no scope) must name
// one.
func owningProject(scope, requested, what string, required bool) (string, error) {
	switch {
	case requested == "" && scope == "" && required:
		return "", apiErr(http.StatusBadRequest, CodeInvalidProject, "A project is required: set \"project\" or the "+ProjectHeader+" header.")
	case requested == "":
		return scope, nil
	case scope != "" && requested != scope:
		return "", apiErr(http.StatusForbidden, CodeInvalidProject, "A caller scoped to one project cannot create "+what+" for another.")
	case !projectRE.MatchString(requested):
		return "", apiErr(http.StatusBadRequest, CodeInvalidProject, "Project "+strconv.Quote(truncate(requested))+" is not a valid project id.")
	}
	return requested, nil
}

// createVTPM is the operator's (see routes): the cloud creates a vTPM for
// an instance it knows is the project's. A project that could would also
// squat other projects' future instance ids, and learn which ids exist.
func (s *Server) createVTPM(w http.ResponseWriter, r *http.Request) error {
	var req api.CreateVTPMRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	id, err := instanceID(req.InstanceID)
	if err != nil {
		return err
	}
	if req.Project, err = owningProject("", req.Project, "vTPMs", true); err != nil {
		return err
	}
	sp, err := spec.Resolve(specRequest(req.ResolveRequest), s.Options)
	if err != nil {
		return err
	}
	if sp == nil {
		return apiErr(http.StatusBadRequest, CodeNoVTPMRequested,
			"The flavor and image ask for no vTPM; set hw:tpm_version on the flavor or hw_tpm_version on the image.")
	}

	if sp.Hypervisor == spec.HyperV {
		if err := s.checkVTPMKeys(r.Context(), req.Project, sp.Keys); err != nil {
			return err
		}
	}

	// Refuse duplicates and full fleets before a secret exists.
	var host spec.Host
	err = s.Store.View(r.Context(), func(tx *store.Tx) error {
		if _, err := tx.GetVTPM(id); err == nil {
			return store.ErrExists
		} else if !errors.Is(err, store.ErrNotFound) {
			return err
		}
		hosts, err := candidates(tx)
		if err != nil {
			return err
		}
		host, err = spec.Place(hosts, sp.RequiredTraits())
		return err
	})
	if err != nil {
		return err
	}

	payload, err := keyring.NewVTPMSecret()
	if err != nil {
		return err
	}
	v := &store.VTPM{InstanceID: id, Project: req.Project, Spec: *sp, Host: host.Name,
		Desired: store.DesiredRunning, Phase: store.PhasePending}
	// A racing create of the same instance loses here, and its secret goes.
	_, err = keyring.CreateRecorded(r.Context(), s.Keyring, req.Project, payload, func(secretID string) error {
		v.SecretID = secretID
		return s.Store.Update(r.Context(), func(tx *store.Tx) error {
			if err := tx.CreateVTPM(v); err != nil {
				return err
			}
			return tx.AppendEvent(store.Event{Actor: actor(r, ""), InstanceID: id, Action: "created",
				Detail: fmt.Sprintf("TPM %s %s on host %s", sp.Version, sp.Model, host.Name)})
		})
	})
	if err != nil {
		return fmt.Errorf("creating vTPM %s: %w", id, err)
	}
	s.notify(host.Name)
	w.Header().Set("Location", "/v1/vtpms/"+id)
	writeJSON(w, http.StatusAccepted, s.view(v))
	return nil
}

// candidates are the registered hosts with their free capacity.
func candidates(tx *store.Tx) ([]spec.Host, error) {
	hosts, err := tx.ListHosts()
	if err != nil {
		return nil, err
	}
	used, err := tx.CountVTPMs()
	if err != nil {
		return nil, err
	}
	out := make([]spec.Host, len(hosts))
	for i, h := range hosts {
		out[i] = spec.Host{Name: h.Name, Traits: spec.NewTraitSet(h.Traits...), Free: h.Capacity - used[h.Name]}
	}
	return out, nil
}

// lookup reads a vTPM the caller may see; another project's is "not found".
func (s *Server) lookup(r *http.Request) (*store.VTPM, string, error) {
	scope, err := project(r)
	if err != nil {
		return nil, "", err
	}
	id, err := instanceID(r.PathValue("id"))
	if err != nil {
		return nil, "", err
	}
	var v *store.VTPM
	err = s.Store.View(r.Context(), func(tx *store.Tx) (err error) { v, err = tx.GetVTPM(id); return err })
	if err == nil && scope != "" && v.Project != scope {
		err = store.ErrNotFound
	}
	return v, scope, err
}

func (s *Server) listVTPMs(w http.ResponseWriter, r *http.Request) error {
	scope, err := project(r)
	if err != nil {
		return err
	}
	q := r.URL.Query()
	f := store.Filter{Project: q.Get("project"), Host: q.Get("host"), Phase: store.Phase(q.Get("phase")), After: q.Get("after"), Limit: 100}
	if scope != "" {
		if f.Project != "" && f.Project != scope {
			return apiErr(http.StatusForbidden, CodeInvalidProject, "A caller scoped to one project cannot list another's vTPMs.")
		}
		f.Project = scope
	}
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > 1000 {
			return apiErr(http.StatusBadRequest, CodeInvalidParameter, "limit must be a whole number from 1 to 1000.")
		}
		f.Limit = n
	}
	switch f.Phase {
	case "", store.PhasePending, store.PhaseProvisioning, store.PhaseActive, store.PhaseStopped, store.PhaseDeleting, store.PhaseError:
	default:
		return apiErr(http.StatusBadRequest, CodeInvalidParameter, "phase must be one of pending, provisioning, active, stopped, deleting, error.")
	}
	// Fetch one more than the page to know whether a next page exists.
	f.Limit++
	var vs []*store.VTPM
	if err := s.Store.View(r.Context(), func(tx *store.Tx) (err error) { vs, err = tx.ListVTPMs(f); return err }); err != nil {
		return err
	}
	out := api.VTPMList{Items: []api.VTPM{}}
	if len(vs) == f.Limit {
		vs = vs[:len(vs)-1]
		out.Next = vs[len(vs)-1].InstanceID
	}
	for _, v := range vs {
		out.Items = append(out.Items, s.view(v))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// deleteVTPM deletes a vTPM and shreds its secret before it answers,
// whatever phase the vTPM is in: one transaction marks the record deleted
// (from then on nothing may start it or point it at another secret) and
// reads the secret it names, which is shredded right after the commit
// (keyring.ShredRecorded). The host's agent then removes the state and the
// record, and anything it was still making for the vTPM.
//
// A vTPM no agent has acted on has nothing on any host and goes at once,
// record and all (200, phase deleted): a host without a vtpmd agent
// (Hyper-V) would never finish its delete. An agent's first act is recorded
// in the same store, so the check is part of the transaction.
func (s *Server) deleteVTPM(w http.ResponseWriter, r *http.Request) error {
	scope, err := project(r)
	if err != nil {
		return err
	}
	id, err := instanceID(r.PathValue("id"))
	if err != nil {
		return err
	}
	var v *store.VTPM
	var gone bool
	err = keyring.ShredRecorded(r.Context(), s.Keyring, func() ([]string, error) {
		err := s.Store.Update(r.Context(), func(tx *store.Tx) (err error) {
			if v, err = tx.GetVTPM(id); err != nil {
				return err
			}
			if scope != "" && v.Project != scope {
				return fmt.Errorf("vtpm %s: %w", id, store.ErrNotFound)
			}
			if gone, err = untouched(tx, v); err != nil {
				return err
			}
			if gone {
				return deleteRecord(tx, v.InstanceID, store.Event{Actor: actor(r, scope), InstanceID: id, Action: "deleted",
					Detail: "never provisioned: nothing on the host"})
			}
			if v.Desired == store.DesiredDeleted {
				return nil // asked before; the secret is shredded again, harmlessly
			}
			v.Desired = store.DesiredDeleted
			if err := tx.UpdateVTPM(v); err != nil {
				return err
			}
			return tx.AppendEvent(store.Event{Actor: actor(r, scope), InstanceID: id, Action: "delete requested"})
		})
		if err != nil {
			return nil, err
		}
		return []string{v.SecretID}, nil
	})
	if err != nil {
		return err
	}
	if gone {
		view := s.view(v)
		view.Desired, view.Phase = string(store.DesiredDeleted), "deleted"
		writeJSON(w, http.StatusOK, view)
		return nil
	}
	s.notify(v.Host)
	writeJSON(w, http.StatusAccepted, s.view(v))
	return nil
}

// untouched reports whether no agent has acted on v: nothing of it exists
// on any host.
func untouched(tx *store.Tx, v *store.VTPM) (bool, error) {
	if v.Phase != store.PhasePending || len(v.EKs) > 0 {
		return false, nil
	}
	evs, err := tx.ListEvents(v.InstanceID, v.Incarnation)
	if err != nil {
		return false, err
	}
	return !slices.ContainsFunc(evs, func(e store.Event) bool { return strings.HasPrefix(e.Actor, "agent:") }), nil
}

// deleteRecord removes a vTPM's record and attestation state, and logs e.
func deleteRecord(tx *store.Tx, id string, e store.Event) error {
	if err := tx.DeleteVTPM(id); err != nil {
		return err
	}
	if err := tx.DeleteAttestation(id); err != nil {
		return err
	}
	return tx.AppendEvent(e)
}

func (s *Server) startVTPM(w http.ResponseWriter, r *http.Request) error {
	return s.change(w, r, "start requested", func(v *store.VTPM) error { return desire(v, store.DesiredRunning) })
}

func (s *Server) stopVTPM(w http.ResponseWriter, r *http.Request) error {
	return s.change(w, r, "stop requested", func(v *store.VTPM) error { return desire(v, store.DesiredStopped) })
}

// desire sets what the user wants. A deleted vTPM cannot be started again.
func desire(v *store.VTPM, d store.Desired) error {
	if v.Desired == store.DesiredDeleted && d != store.DesiredDeleted {
		return apiErr(http.StatusConflict, CodeConflict, "The vTPM is being deleted.")
	}
	v.Desired = d
	return nil
}

// domainRE bounds libvirt domain names to what is safe in paths and XML.
var domainRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$`)

func (s *Server) attachVTPM(w http.ResponseWriter, r *http.Request) error {
	var req api.AttachRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	if !domainRE.MatchString(req.Domain) {
		return apiErr(http.StatusBadRequest, CodeInvalidParameter, "Domain "+strconv.Quote(truncate(req.Domain))+
			" is not a valid libvirt domain name (letters, digits, '_', '.', '+', '-'; at most 128).")
	}
	return s.change(w, r, "attach to domain "+req.Domain, func(v *store.VTPM) error {
		if err := s.canAttach(r.Context(), v); err != nil {
			return err
		}
		if v.Domain != "" && v.Domain != req.Domain {
			return apiErr(http.StatusConflict, CodeConflict, "The vTPM is attached to domain "+v.Domain+"; detach it first.")
		}
		v.Domain = req.Domain
		return nil
	})
}

func (s *Server) detachVTPM(w http.ResponseWriter, r *http.Request) error {
	return s.change(w, r, "detach", func(v *store.VTPM) error {
		v.Domain = ""
		return nil
	})
}

// canAttach refuses vTPMs on hosts whose backend has no guests to attach
// to, and deleted ones.
func (s *Server) canAttach(ctx context.Context, v *store.VTPM) error {
	if v.Desired == store.DesiredDeleted {
		return apiErr(http.StatusConflict, CodeConflict, "The vTPM is being deleted.")
	}
	var h *store.Host
	err := s.Store.View(ctx, func(tx *store.Tx) (err error) {
		h, err = tx.GetHost(v.Host)
		return err
	})
	if err != nil {
		return err
	}
	if h.Backend != "libvirt" {
		return apiErr(http.StatusConflict, CodeNotSupported, "Host "+h.Name+" runs the "+h.Backend+
			" backend, which has no libvirt domains to attach to.")
	}
	return nil
}

// change applies mutate to the vTPM named in the request, records the
// event when it changed anything, wakes the host's agent and answers 202.
// Repeating a request is harmless.
func (s *Server) change(w http.ResponseWriter, r *http.Request, action string, mutate func(*store.VTPM) error) error {
	v, scope, err := s.lookup(r)
	if err != nil {
		return err
	}
	return s.changeVTPM(w, r, v, scope, action, mutate)
}

// changeVTPM is change for a vTPM already looked up.
func (s *Server) changeVTPM(w http.ResponseWriter, r *http.Request, v *store.VTPM, scope, action string, mutate func(*store.VTPM) error) error {
	before := *v
	if err := mutate(v); err != nil {
		return err
	}
	switch {
	case v.Desired != store.DesiredDeleted && v.Phase == store.PhaseError:
		v.Reason = "" // a new request retries from the error
	case v.Desired == store.DesiredRunning && v.Phase == store.PhaseActive,
		v.Domain != before.Domain && v.Phase == store.PhaseStopped:
		// The agent looks again: a start starts a guest that powered
		// itself off; an attach or detach changes its domain.
		v.Phase = store.PhasePending
	}
	if v.Desired != before.Desired || v.Domain != before.Domain || v.Phase != before.Phase || v.Reason != before.Reason {
		err := s.Store.Update(r.Context(), func(tx *store.Tx) error {
			if err := tx.UpdateVTPM(v); err != nil {
				return err
			}
			return tx.AppendEvent(store.Event{Actor: actor(r, scope), InstanceID: v.InstanceID, Action: action})
		})
		if err != nil {
			return err
		}
	}
	s.notify(v.Host)
	writeJSON(w, http.StatusAccepted, s.view(v))
	return nil
}

func (s *Server) identity(w http.ResponseWriter, r *http.Request) error {
	v, _, err := s.lookup(r)
	if err != nil {
		return err
	}
	if len(v.EKs) == 0 {
		return apiErr(http.StatusConflict, CodeNotReady, "The vTPM has not been manufactured yet (phase "+string(v.Phase)+").")
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
	var evs []store.Event
	if all {
		if evs, err = s.allEvents(r); err != nil {
			return err
		}
	} else {
		v, _, err := s.lookup(r)
		if err != nil {
			return err
		}
		if err := s.Store.View(r.Context(), func(tx *store.Tx) (err error) { evs, err = tx.ListEvents(v.InstanceID, v.Incarnation); return err }); err != nil {
			return err
		}
	}
	out := api.EventList{Items: []api.Event{}}
	for _, e := range evs {
		out.Items = append(out.Items, api.Event{At: e.At, Actor: e.Actor, Action: e.Action, Detail: e.Detail, Incarnation: e.Incarnation})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// allEvents is the operator's audit trail of an instance id: the events of
// every vTPM it has had. A project sees only its own vTPM's.
func (s *Server) allEvents(r *http.Request) ([]store.Event, error) {
	scope, err := project(r)
	if err != nil {
		return nil, err
	}
	if scope != "" {
		return nil, apiErr(http.StatusForbidden, CodeForbidden, "?all is the operator's: a project sees the events of its own vTPM only.")
	}
	id, err := instanceID(r.PathValue("id"))
	if err != nil {
		return nil, err
	}
	var evs []store.Event
	if err := s.Store.View(r.Context(), func(tx *store.Tx) (err error) { evs, err = tx.ListAllEvents(id); return err }); err != nil {
		return nil, err
	}
	if len(evs) == 0 {
		return nil, store.ErrNotFound
	}
	return evs, nil
}

// boolParam reads an optional true/false query parameter.
func boolParam(r *http.Request, name string) (bool, error) {
	raw := r.URL.Query().Get(name)
	if raw == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(raw)
	if err != nil {
		return false, apiErr(http.StatusBadRequest, CodeInvalidParameter, name+" is true or false.")
	}
	return b, nil
}

func (s *Server) listHosts(w http.ResponseWriter, r *http.Request) error {
	hosts, err := s.hosts(r.Context(), "")
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.HostList{Items: hosts})
	return nil
}

func (s *Server) getHost(w http.ResponseWriter, r *http.Request) error {
	hosts, err := s.hosts(r.Context(), r.PathValue("name"))
	if err != nil {
		return err
	}
	if len(hosts) == 0 {
		return apiErr(http.StatusNotFound, CodeNotFound, "No such host.")
	}
	writeJSON(w, http.StatusOK, hosts[0])
	return nil
}

// hosts returns all hosts, or the one named.
func (s *Server) hosts(ctx context.Context, name string) ([]api.Host, error) {
	out := []api.Host{}
	err := s.Store.View(ctx, func(tx *store.Tx) error {
		hosts, err := tx.ListHosts()
		if err != nil {
			return err
		}
		used, err := tx.CountVTPMs()
		if err != nil {
			return err
		}
		for _, h := range hosts {
			if name == "" || h.Name == name {
				out = append(out, api.Host{Name: h.Name, Backend: h.Backend, Traits: h.Traits, Capacity: h.Capacity, Used: used[h.Name], SeenAt: h.SeenAt})
			}
		}
		return nil
	})
	return out, err
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
	hosts, err := s.hosts(r.Context(), r.PathValue("name"))
	if err != nil {
		return err
	}
	if len(hosts) == 0 {
		return apiErr(http.StatusNotFound, CodeNotFound, "No such host.")
	}
	if s.Drift == nil {
		return apiErr(http.StatusConflict, CodeNotSupported, "No agent here can check this host's drift.")
	}
	d, err := s.Drift(r.Context(), hosts[0].Name, repair)
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

// view is a record as the API shows it.
func (s *Server) view(v *store.VTPM) api.VTPM {
	out := api.VTPM{InstanceID: v.InstanceID, Project: v.Project, Spec: *spec.Resolution(&v.Spec).VTPM,
		Host: v.Host, Desired: string(v.Desired), Phase: string(v.Phase), Reason: v.Reason, SecretRef: v.SecretID,
		Domain: v.Domain, Incarnation: v.Incarnation, CreatedAt: v.CreatedAt, UpdatedAt: v.UpdatedAt}
	if len(v.EKs) > 0 && s.Sockets != nil {
		out.Sockets = s.Sockets(v.Host, v.InstanceID)
	}
	return out
}

func (s *Server) notify(host string) {
	if s.Notify != nil {
		s.Notify(host)
	}
}

// actor names who made a change through the API, for the event log: the
// operator or a project, and the holder of the client certificate or the
// local user that proved it. A request with no authenticated caller is an
// agent's, proven by its token or its TPM: it is named as the agent of
// the instance or host it speaks for, never as a project or the operator.
func actor(r *http.Request, scope string) string {
	c, ok := callerOf(r)
	if !ok {
		return "attestation agent"
	}
	who := "api:operator"
	if scope != "" {
		who = "api:project:" + scope
	}
	if c.name != "" {
		who += " (" + strconv.QuoteToGraphic(truncate(c.name)) + ")"
	}
	return who
}

// byVTPMD names vtpmd itself in the event log, for what it changes on its
// own (a verdict turning stale, a host's verdict reaching its instances).
const byVTPMD = "vtpmd"

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}
