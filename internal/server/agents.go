package server

import (
	"crypto/x509"
	"errors"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/bundle"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// The agent protocol's vTPM routes. The host is always the one the
// client certificate names (hostOf); a host reads and writes only the
// vTPMs placed on it (agentstore.Records.Placed).

// traitRE and maxTraits bound the traits a host registers: placement
// traits as os-traits names them.
var traitRE = regexp.MustCompile(`^(COMPUTE|CUSTOM)_[A-Z0-9_]{1,250}$`)

const maxTraits = 64

// maxCapacity bounds what a host may say it takes: placement prefers the
// host with the most room, so a host claiming millions would draw every
// new vTPM.
const maxCapacity = 100000

// maxRun bounds the name of an agent's run a host registers.
const maxRun = 64

// defaultWatchWait is how long a watch without ?wait= waits for a change.
const defaultWatchWait = 30 * time.Second

// registerHost records what the calling host's agent offers.
func (s *Server) registerHost(w http.ResponseWriter, r *http.Request) error {
	var req api.AgentHost
	if err := decode(w, r, &req); err != nil {
		return err
	}
	switch {
	case len(req.Version) > maxVersion:
		return refusal.Invalid(api.CodeInvalidParameter, "version is at most 128 bytes.")
	case req.Capacity < 0 || req.Capacity > maxCapacity:
		return refusal.Invalid(api.CodeInvalidParameter, "capacity is 0 to 100000 vTPMs.")
	case req.Backend == "" || len(req.Backend) > 32:
		return refusal.Invalid(api.CodeInvalidParameter, "backend names the host's backend (swtpm, libvirt, xen, ...).")
	case len(req.Run) > maxRun:
		return refusal.Invalid(api.CodeInvalidParameter, "run is at most 64 bytes.")
	}
	if len(req.Traits) > maxTraits || slices.ContainsFunc(req.Traits, func(t string) bool { return !traitRE.MatchString(t) }) {
		return refusal.Invalid(api.CodeInvalidParameter, "traits are at most 64 placement traits (COMPUTE_... or CUSTOM_..., upper case).")
	}
	h := agent.Host{Name: hostName(r), Traits: spec.NewTraitSet(req.Traits...).List(), Capacity: req.Capacity, Backend: req.Backend, Version: req.Version,
		Run: req.Run}
	if err := s.Agents.RegisterHost(r.Context(), h); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// watchVTPMs answers what changed among the calling host's vTPMs after
// ?since= (0 or absent: everything), waiting up to ?wait= for a change.
func (s *Server) watchVTPMs(w http.ResponseWriter, r *http.Request) error {
	var since int64
	if q := r.URL.Query().Get("since"); q != "" {
		var err error
		if since, err = strconv.ParseInt(q, 10, 64); err != nil || since < 0 {
			return refusal.Invalid(api.CodeInvalidParameter, "since is a revision: a whole number, 0 or more.")
		}
	}
	over, end, err := s.longPoll(r, defaultWatchWait)
	if err != nil {
		return err
	}
	defer end()
	ch, err := s.Agents.WatchUntil(r.Context(), hostName(r), since, over)
	if err != nil {
		return err
	}
	out := api.AgentChanges{Revision: ch.Revision, Reset: ch.Reset, VTPMs: make([]api.AgentVTPM, len(ch.Records)), Gone: []api.AgentGone{}}
	for i, rec := range ch.Records {
		out.VTPMs[i] = agentVTPM(rec)
	}
	for _, g := range ch.Gone {
		out.Gone = append(out.Gone, api.AgentGone{InstanceID: g.InstanceID, Incarnation: g.Incarnation})
	}
	if ch.Drift.ID != 0 {
		out.Drift = &api.AgentDriftAsk{ID: ch.Drift.ID, Repair: ch.Drift.Repair}
	}
	for _, a := range ch.Adoptions {
		out.Adoptions = append(out.Adoptions, api.AgentAdoptionAsk{ID: a.ID, InstanceID: a.InstanceID, Domain: a.Domain, SecretRef: a.SecretID})
	}
	for _, x := range ch.Transfers {
		out.Transfers = append(out.Transfers, api.AgentTransferAsk{ID: x.ID, InstanceID: x.InstanceID, Incarnation: x.Incarnation,
			Kind: string(x.Kind), Generation: x.Generation})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// placed reads the vTPM the path names, if it is the calling host's.
func (s *Server) placed(r *http.Request) (*agent.Record, error) {
	return s.Agents.Placed(r.Context(), hostName(r), r.PathValue("id"))
}

// placedAt is placed, as the agent read it (incarnation and generation),
// for a write that must find it unchanged.
func (s *Server) placedAt(r *http.Request, incarnation string, generation int64) (*agent.Record, error) {
	rec, err := s.placed(r)
	if err != nil {
		return nil, err
	}
	rec.Incarnation, rec.Generation = incarnation, generation
	return rec, nil
}

func (s *Server) agentGetVTPM(w http.ResponseWriter, r *http.Request) error {
	rec, err := s.placed(r)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, agentVTPM(rec))
	return nil
}

// reportVTPM records what the agent observed of a vTPM placed on its
// host (which the write checks: agentstore.Records.Update).
func (s *Server) reportVTPM(w http.ResponseWriter, r *http.Request) error {
	var req api.AgentReport
	if err := decode(w, r, &req); err != nil {
		return err
	}
	rec := &agent.Record{InstanceID: r.PathValue("id"), Host: hostName(r), Incarnation: req.Incarnation, Generation: req.Generation,
		Phase: agent.Phase(req.Phase), Reason: req.Reason, EKs: agentEKs(req.EKs), PID: req.SwtpmPID, Connected: req.GuestConnected}
	if req.Sockets != nil {
		rec.Sockets = *req.Sockets
	}
	if err := s.Agents.Update(r.Context(), rec, s.agentEvent(r, req.Event)); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.AgentWritten{Generation: rec.Generation, SecretRef: rec.SecretID})
	return nil
}

// vtpmDeleted removes the record of a vTPM whose state the agent removed.
func (s *Server) vtpmDeleted(w http.ResponseWriter, r *http.Request) error {
	var req api.AgentDeletion
	if err := decode(w, r, &req); err != nil {
		return err
	}
	rec, err := s.placedAt(r, req.Incarnation, req.Generation)
	if err != nil {
		return err
	}
	if err := s.Agents.Delete(r.Context(), rec, s.agentEvent(r, req.Event)); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// vtpmSecret releases the secret that keys a vTPM's state to its host's
// agent (the read checks the host: agentstore.Records.Secret).
func (s *Server) vtpmSecret(w http.ResponseWriter, r *http.Request) error {
	rec := &agent.Record{InstanceID: r.PathValue("id"), Host: hostName(r), Incarnation: r.URL.Query().Get("incarnation")}
	payload, err := s.Agents.Secret(r.Context(), rec)
	if err != nil {
		return err
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, api.AgentSecret{SecretRef: rec.SecretID, Payload: payload})
	return nil
}

// rekeyVTPM gives a vTPM not yet manufactured the secret of a TPM from
// the agent's pool.
func (s *Server) rekeyVTPM(w http.ResponseWriter, r *http.Request) error {
	var req api.AgentRekey
	if err := decode(w, r, &req); err != nil {
		return err
	}
	rec, err := s.placedAt(r, req.Incarnation, req.Generation)
	if err != nil {
		return err
	}
	if err := s.Agents.Rekey(r.Context(), rec, req.Payload, s.agentEvent(r, req.Event)); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.AgentWritten{Generation: rec.Generation, SecretRef: rec.SecretID})
	return nil
}

// vtpmResized ends a confirmed or reverted resize whose step the agent
// finished.
func (s *Server) vtpmResized(w http.ResponseWriter, r *http.Request) error {
	var req api.AgentResized
	if err := decode(w, r, &req); err != nil {
		return err
	}
	rec, err := s.placedAt(r, req.Incarnation, req.Generation)
	if err != nil {
		return err
	}
	if err := s.Agents.Resized(r.Context(), rec, s.agentEvent(r, req.Event)); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.AgentWritten{Generation: rec.Generation, SecretRef: rec.SecretID})
	return nil
}

// agentEvent is the event an agent asked to log, in its host's name.
func (s *Server) agentEvent(r *http.Request, e api.AgentEvent) agent.Event {
	return agent.Event{Actor: "agent:" + hostName(r), Action: refusal.Truncate(e.Action), Detail: truncateDetail(e.Detail)}
}

// truncateDetail bounds an event's detail an agent sends.
func truncateDetail(s string) string {
	if len(s) > 1024 {
		return s[:1024] + "..."
	}
	return s
}

// agentVTPM is rec on the wire.
func agentVTPM(rec *agent.Record) api.AgentVTPM {
	out := api.AgentVTPM{InstanceID: rec.InstanceID, Incarnation: rec.Incarnation, Project: rec.Project, Spec: spec.APISpec(rec.Spec),
		Host: rec.Host, Domain: rec.Domain, Desired: string(rec.Desired), Phase: string(rec.Phase), Reason: rec.Reason,
		SecretRef: rec.SecretID, EKs: []api.AgentEK{}, SwtpmPID: rec.PID, GuestConnected: rec.Connected, Resize: string(rec.Resize),
		Generation: rec.Generation}
	for _, ek := range rec.EKs {
		out.EKs = append(out.EKs, api.AgentEK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, Public: ek.PublicDER, Certificate: ek.CertDER})
	}
	if rec.Sockets != (api.Sockets{}) {
		out.Sockets = &rec.Sockets
	}
	return out
}

func agentEKs(eks []api.AgentEK) []agent.EK {
	var out []agent.EK
	for _, ek := range eks {
		out = append(out, agent.EK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: ek.Public, CertDER: ek.Certificate})
	}
	return out
}

// certifyEK has the deployment CA certify the EK of a vTPM the calling
// host is manufacturing: placed on it, or for its pool. A host runs its
// vTPMs' TPMs, so it is trusted with their identities; each certificate is
// logged with the host that asked.
func (s *Server) certifyEK(w http.ResponseWriter, r *http.Request) error {
	var req api.EKCertificateRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	if req.InstanceID != "" {
		rec, err := s.Agents.Placed(r.Context(), hostName(r), req.InstanceID)
		if err != nil {
			return err
		}
		if len(rec.EKs) > 0 {
			return refusal.Conflict(api.CodeConflict, "The vTPM's endorsement keys are recorded: it is manufactured, and its EKs are certified already.")
		}
	}
	if req.TPMVersion != string(spec.V20) && req.TPMVersion != string(spec.V12) {
		return refusal.Invalid(api.CodeInvalidTPMVersion, "tpm_version is 1.2 or 2.0.")
	}
	pub, err := x509.ParsePKIXPublicKey(req.Public)
	if err != nil {
		return refusal.Invalid(api.CodeInvalidParameter, "public is not a PKIX public key (DER).")
	}
	cert, err := s.EKCA.IssueVTPMEK(pub, req.TPMVersion)
	if errors.Is(err, ca.ErrUnsupportedKey) || errors.Is(err, ca.ErrInvalidProfile) {
		return refusal.Invalid(api.CodeInvalidParameter, "The key is not one a TPM's EK template makes: "+err.Error())
	}
	if err != nil {
		return err
	}
	s.Log.Info("certified a vTPM's EK", "host", hostName(r), "instance", req.InstanceID, "tpm_version", req.TPMVersion)
	writeJSON(w, http.StatusOK, api.IssuedEKCertificate{Certificate: cert})
	return nil
}

// reportDrift records the calling host's answer to a drift request.
func (s *Server) reportDrift(w http.ResponseWriter, r *http.Request) error {
	var req api.AgentDriftReport
	if err := decode(w, r, &req); err != nil {
		return err
	}
	if req.Findings == nil {
		req.Findings = []api.Finding{}
	}
	if err := s.Agents.ReportDrift(r.Context(), hostName(r), req.Asked, req.Findings); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// adoptionSecret releases to the calling host, answering its adoption
// request, the secret that keys the vTPM it is to take over.
func (s *Server) adoptionSecret(w http.ResponseWriter, r *http.Request) error {
	id := r.URL.Query().Get("secret_ref")
	payload, err := s.Agents.AdoptionSecret(r.Context(), hostName(r), agent.AdoptionAsk{ID: r.PathValue("id")}, id)
	if err != nil {
		return err
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, api.AgentSecret{SecretRef: id, Payload: payload})
	return nil
}

// answerAdoption records the calling host's answer to its adoption
// request.
func (s *Server) answerAdoption(w http.ResponseWriter, r *http.Request) error {
	var req api.AgentAdoption
	if err := decode(w, r, &req); err != nil {
		return err
	}
	if err := validAdoption(req); err != nil {
		return err
	}
	if err := s.Agents.AnswerAdoption(r.Context(), hostName(r), agent.AdoptionAsk{ID: r.PathValue("id")}, agent.AdoptionFromAPI(req)); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// validAdoption refuses an answer no agent gives: a refusal with a code
// adoptions do not have, or a vTPM without its secret, version or keys.
func validAdoption(a api.AgentAdoption) error {
	switch {
	case len(a.Message) > 4096:
		return refusal.Invalid(api.CodeInvalidParameter, "The message is longer than 4096 bytes.")
	case a.Code != "" && !agent.ValidAdoptionRefusal(a.Code):
		return refusal.Invalid(api.CodeInvalidParameter, "code "+refusal.Quote(string(a.Code))+" is not one an adoption is refused with.")
	case a.Code != "":
		return nil
	case !keyring.ValidID(a.SecretRef):
		return refusal.Invalid(api.CodeInvalidParameter, "secret_ref is a lowercase UUID.")
	case a.Spec.Version != string(spec.V20) && a.Spec.Version != string(spec.V12):
		return refusal.Invalid(api.CodeInvalidTPMVersion, "spec.version is 1.2 or 2.0.")
	case len(a.EKs) == 0 || len(a.EKs) > 8:
		return refusal.Invalid(api.CodeInvalidParameter, "An adopted vTPM has one to eight endorsement keys.")
	}
	for _, ek := range a.EKs {
		if ek.Kind == "" || len(ek.Public) == 0 {
			return refusal.Invalid(api.CodeInvalidParameter, "An endorsement key needs a kind and a public key.")
		}
	}
	return nil
}

// maxTransferBody bounds an agent's answer to a transfer: a state bundle
// (bundle.MaxSize) in base64.
const maxTransferBody = (bundle.MaxSize/3+1)*4 + 4096

// transferInput releases to the calling host, answering its transfer
// request, the secret of the vTPM and the bundle to import, if any.
func (s *Server) transferInput(w http.ResponseWriter, r *http.Request) error {
	in, err := s.Agents.TransferInput(r.Context(), hostName(r), agent.TransferAsk{ID: r.PathValue("id")})
	if err != nil {
		return err
	}
	w.Header().Set("Cache-Control", "no-store")
	out := api.AgentTransferInput{Payload: in.Secret, Bundle: in.Bundle, Cancel: in.Cancel}
	if in.Record != nil {
		rec := agentVTPM(in.Record)
		out.VTPM = &rec
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// takeTransfer records that the calling host's agent, in the run it
// registered last, carries out its transfer request apart from its watch,
// which hands the request to that run no more.
func (s *Server) takeTransfer(w http.ResponseWriter, r *http.Request) error {
	if err := s.Agents.TakeTransfer(r.Context(), hostName(r), agent.TransferAsk{ID: r.PathValue("id")}); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// answerTransfer records the calling host's answer to its transfer
// request.
func (s *Server) answerTransfer(w http.ResponseWriter, r *http.Request) error {
	var req api.AgentTransfer
	if err := decodeUpTo(w, r, &req, maxTransferBody); err != nil {
		return err
	}
	switch {
	case len(req.Message) > 4096:
		return refusal.Invalid(api.CodeInvalidParameter, "The message is longer than 4096 bytes.")
	case req.Code != "" && !agent.ValidTransferRefusal(req.Code):
		return refusal.Invalid(api.CodeInvalidParameter, "code "+refusal.Quote(string(req.Code))+" is not one a transfer is refused with.")
	case req.Code != "" && len(req.Bundle) > 0:
		return refusal.Invalid(api.CodeInvalidParameter, "A refusal carries no bundle.")
	}
	if err := s.Agents.AnswerTransfer(r.Context(), hostName(r), agent.TransferAsk{ID: r.PathValue("id")}, agent.TransferFromAPI(req)); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
