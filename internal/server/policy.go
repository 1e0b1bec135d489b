package server

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"regexp"
	"slices"
	"strconv"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/store"
)

var policyNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// createPolicy makes a named policy from reference values, or learns one
// from the last accepted evidence of an instance or a host. Its body may
// list the files of a whole system (an IMA allowlist): up to maxPolicyBody.
func (s *Server) createPolicy(w http.ResponseWriter, r *http.Request) error {
	var req api.CreatePolicyRequest
	if err := decodeUpTo(w, r, &req, maxPolicyBody); err != nil {
		return err
	}
	scope, err := project(r)
	if err != nil {
		return err
	}
	if !policyNameRE.MatchString(req.Name) {
		return apiErr(http.StatusBadRequest, CodeInvalidParameter, "Policy name "+strconv.Quote(truncate(req.Name))+" is invalid: lower-case letters, digits, '.', '_' and '-', at most 63.")
	}
	// The operator's policies without a project are shared.
	if req.Project, err = owningProject(scope, req.Project, "policies", false); err != nil {
		return err
	}
	p := &store.Policy{Project: req.Project, Name: req.Name}
	switch {
	case (len(req.PCRs) > 0 || len(req.Digests) > 0) == (req.LearnFrom != nil):
		return apiErr(http.StatusBadRequest, CodeInvalidParameter, "Give either reference values (\"pcrs\", \"digests\") or where to learn them (\"learn_from\").")
	case req.LearnFrom != nil:
		learned, from, err := s.learnFrom(r.Context(), scope, req.LearnFrom)
		if err != nil {
			return err
		}
		p.PCRs, p.Digests, p.EventLog, p.LearnedFrom = learned.PCRs, learned.Digests, learned.EventLog, from
	default:
		if p.PCRs, p.Digests, err = referenceValues(req.PCRs, req.Digests); err != nil {
			return err
		}
	}
	err = s.Store.Update(r.Context(), func(tx *store.Tx) error { return tx.CreatePolicy(p) })
	if errors.Is(err, store.ErrExists) {
		return apiErr(http.StatusConflict, CodeAlreadyExists, "A policy named "+p.Name+" exists already; delete it first or choose another name.")
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, policyView(p))
	return nil
}

// referenceValues checks hand-written reference values and allowed
// digests: SHA-256 digests, in hex, for existing PCRs.
func referenceValues(values map[int]string, digests map[int][]string) (map[int][]byte, map[int][][]byte, error) {
	sha256Hex := func(i int, h string) ([]byte, error) {
		if err := checkPCR(i); err != nil {
			return nil, err
		}
		v, err := hex.DecodeString(h)
		if err != nil || len(v) != 32 {
			return nil, apiErr(http.StatusBadRequest, CodeInvalidParameter, fmt.Sprintf("PCR %d: %q is not a SHA-256 digest in hex (64 digits).", i, truncate(h)))
		}
		return v, nil
	}
	pcrs, allowed := map[int][]byte{}, map[int][][]byte{}
	for i, h := range values {
		v, err := sha256Hex(i, h)
		if err != nil {
			return nil, nil, err
		}
		pcrs[i] = v
	}
	for i, hs := range digests {
		if len(hs) == 0 {
			return nil, nil, apiErr(http.StatusBadRequest, CodeInvalidParameter, fmt.Sprintf("PCR %d: an empty list of digests allows nothing.", i))
		}
		for _, h := range hs {
			v, err := sha256Hex(i, h)
			if err != nil {
				return nil, nil, err
			}
			allowed[i] = append(allowed[i], v)
		}
	}
	return pcrs, allowed, nil
}

func checkPCR(i int) error {
	if i < 0 || i > 23 {
		return apiErr(http.StatusBadRequest, CodeInvalidParameter, fmt.Sprintf("PCR %d does not exist (0–23).", i))
	}
	return nil
}

// learnFrom learns a policy from the instance or host named by from, as
// the caller (scope) may see it.
func (s *Server) learnFrom(ctx context.Context, scope string, from *api.LearnFrom) (attest.Policy, string, error) {
	key := from.InstanceID
	switch {
	case (from.InstanceID == "") == (from.Host == ""):
		return attest.Policy{}, "", apiErr(http.StatusBadRequest, CodeInvalidParameter, "learn_from names either an instance (\"instance_id\") or a host (\"host\").")
	case from.Host != "" && scope != "":
		return attest.Policy{}, "", apiErr(http.StatusForbidden, CodeForbidden, "A host's own attestation is for the operator.")
	case from.Host != "":
		key = store.HostKey(from.Host)
	}
	var a *store.Attestation
	err := s.Store.View(ctx, func(tx *store.Tx) error {
		if from.InstanceID != "" {
			v, err := tx.GetVTPM(from.InstanceID)
			if err != nil {
				return err
			}
			if scope != "" && v.Project != scope {
				return store.ErrNotFound
			}
		}
		var err error
		a, err = tx.GetAttestation(key)
		return err
	})
	if errors.Is(err, store.ErrNotFound) {
		return attest.Policy{}, "", apiErr(http.StatusNotFound, CodeNotFound, "No attestation of "+key+" to learn from.")
	}
	if err != nil {
		return attest.Policy{}, "", err
	}
	p, err := learn(a, from.PCRs, from.Digests)
	return p, key, err
}

// learn takes a's last accepted evidence as the reference boot for the
// given PCRs: their values (default: every PCR quoted but IMA's, which
// changes as the system runs), or the digests of what extended them
// (default: every PCR quoted).
func learn(a *store.Attestation, which []int, digests bool) (attest.Policy, error) {
	for _, i := range which {
		if err := checkPCR(i); err != nil {
			return attest.Policy{}, err
		}
	}
	if a.PCRs == nil {
		return attest.Policy{}, apiErr(http.StatusConflict, CodeNoEvidence, "No evidence has been accepted yet to learn from.")
	}
	b, err := lastBoot(a)
	if err != nil {
		return attest.Policy{}, err
	}
	if which == nil {
		which = slices.DeleteFunc(slices.Sorted(maps.Keys(a.PCRs)), func(i int) bool { return i == attest.IMAPCR && !digests })
	}
	p := attest.Learn(b, a.EventLog, which)
	if digests {
		p = attest.LearnDigests(b, which)
	}
	if len(p.PCRs) == 0 && len(p.Digests) == 0 {
		return p, apiErr(http.StatusBadRequest, CodeInvalidParameter, fmt.Sprintf("Nothing to learn: the last accepted evidence has nothing for PCRs %v.", which))
	}
	return p, nil
}

func (s *Server) listPolicies(w http.ResponseWriter, r *http.Request) error {
	scope, err := project(r)
	if err != nil {
		return err
	}
	var projects []string // the operator sees every project's
	if scope != "" {
		projects = []string{scope, ""}
	}
	var ps []*store.Policy
	if err := s.Store.View(r.Context(), func(tx *store.Tx) (err error) { ps, err = tx.ListPolicies(projects...); return err }); err != nil {
		return err
	}
	out := api.PolicyList{Items: []api.Policy{}}
	for _, p := range ps {
		out.Items = append(out.Items, policyView(p))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) getPolicy(w http.ResponseWriter, r *http.Request) error {
	var p *store.Policy
	err := s.policyOp(r, func(tx *store.Tx, project string) (err error) {
		p, err = findPolicy(tx, project, r.PathValue("name"))
		return err
	})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, policyView(p))
	return nil
}

// deletePolicy removes a policy; the instances it was applied to keep
// their copies.
func (s *Server) deletePolicy(w http.ResponseWriter, r *http.Request) error {
	err := s.policyOp(r, func(tx *store.Tx, project string) error {
		p, err := findPolicy(tx, project, r.PathValue("name"))
		if err != nil {
			return err
		}
		if p.Project != project {
			return apiErr(http.StatusForbidden, CodeForbidden, "Policy "+p.Name+" is the operator's; a project cannot delete it.")
		}
		return tx.DeletePolicy(p.Project, p.Name)
	})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// policyOp runs fn in a transaction with the project whose policies the
// request addresses: the caller's, or for the operator ?project= (default
// the operator's own).
func (s *Server) policyOp(r *http.Request, fn func(tx *store.Tx, project string) error) error {
	scope, err := project(r)
	if err != nil {
		return err
	}
	if q := r.URL.Query().Get("project"); q != "" && scope == "" {
		scope = q
	}
	return s.Store.Update(r.Context(), func(tx *store.Tx) error { return fn(tx, scope) })
}

// findPolicy is the policy a project means by name: its own, else the
// operator's shared one.
func findPolicy(tx *store.Tx, project, name string) (*store.Policy, error) {
	p, err := tx.GetPolicy(project, name)
	if errors.Is(err, store.ErrNotFound) && project != "" {
		p, err = tx.GetPolicy("", name)
	}
	if errors.Is(err, store.ErrNotFound) {
		return nil, apiErr(http.StatusNotFound, CodeNotFound, "No policy named "+strconv.Quote(truncate(name))+".")
	}
	return p, err
}

func policyView(p *store.Policy) api.Policy {
	out := api.Policy{Name: p.Name, Project: p.Project, LearnedFrom: p.LearnedFrom, HasEventLog: len(p.EventLog) > 0, CreatedAt: p.CreatedAt}
	for i, v := range p.PCRs {
		if out.PCRs == nil {
			out.PCRs = map[int]string{}
		}
		out.PCRs[i] = hex.EncodeToString(v)
	}
	for i, ds := range p.Digests {
		if out.Digests == nil {
			out.Digests = map[int][]string{}
		}
		for _, d := range ds {
			out.Digests[i] = append(out.Digests[i], hex.EncodeToString(d))
		}
	}
	return out
}
