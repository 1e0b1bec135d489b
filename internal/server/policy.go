package server

import (
	"encoding/hex"
	"net/http"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/store"
)

// createPolicy's body may list the files of a whole system (an IMA
// allowlist): up to maxPolicyBody.
func (s *Server) createPolicy(w http.ResponseWriter, r *http.Request) error {
	var req api.CreatePolicyRequest
	if err := decodeUpTo(w, r, &req, maxPolicyBody); err != nil {
		return err
	}
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	p, err := s.Verifier.CreatePolicy(r.Context(), c, req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, policyView(p))
	return nil
}

func (s *Server) listPolicies(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	ps, err := s.Verifier.Policies(r.Context(), c)
	if err != nil {
		return err
	}
	out := api.PolicyList{Items: []api.Policy{}}
	for _, p := range ps {
		out.Items = append(out.Items, policyView(p))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// getPolicy reads a policy of the caller's project (or the operator's
// shared one); the operator names another project with ?project=.
func (s *Server) getPolicy(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	p, err := s.Verifier.Policy(r.Context(), c, r.URL.Query().Get("project"), r.PathValue("name"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, policyView(p))
	return nil
}

// deletePolicy removes a policy, as getPolicy finds it.
func (s *Server) deletePolicy(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	if err := s.Verifier.DeletePolicy(r.Context(), c, r.URL.Query().Get("project"), r.PathValue("name")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
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
