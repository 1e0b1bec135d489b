package server

import (
	"net/http"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/store"
)

// The key broker's routes: a project's secrets (/v1/broker/secrets) and an
// instance's agent's release (POST /v1/vtpms/{id}/secrets/{secret}/release),
// whose rules are internal/broker's.

func (s *Server) createBrokerSecret(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	var req api.CreateBrokerSecretRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	sec, err := s.Broker.Create(r.Context(), c, req)
	if err != nil {
		return err
	}
	w.Header().Set("Location", "/v1/broker/secrets/"+sec.Name)
	writeJSON(w, http.StatusCreated, brokerSecretView(sec, nil))
	return nil
}

func (s *Server) listBrokerSecrets(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	l, err := s.Broker.List(r.Context(), c)
	if err != nil {
		return err
	}
	out := api.BrokerSecretList{Items: []api.BrokerSecret{}}
	for _, sec := range l {
		out.Items = append(out.Items, brokerSecretView(sec, nil))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) getBrokerSecret(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	sec, rs, err := s.Broker.Get(r.Context(), c, r.URL.Query().Get("project"), r.PathValue("name"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, brokerSecretView(sec, rs))
	return nil
}

func (s *Server) deleteBrokerSecret(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	if err := s.Broker.Delete(r.Context(), c, r.URL.Query().Get("project"), r.PathValue("name")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// releaseSecret answers an instance's registered agent (its bearer token)
// with a secret wrapped for the instance's vTPM.
func (s *Server) releaseSecret(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	out, err := s.Broker.Release(r.Context(), c, r.PathValue("id"), bearerToken(r), r.PathValue("secret"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func brokerSecretView(sec *store.BrokerSecret, rs []store.Release) api.BrokerSecret {
	out := api.BrokerSecret{Name: sec.Name, Project: sec.Project, ReleaseTo: sec.ReleaseTo, Policy: sec.Policy,
		MaxEvidenceAge: sec.MaxEvidenceAge.String(), CreatedAt: sec.CreatedAt}
	for _, r := range rs {
		out.Releases = append(out.Releases, api.SecretRelease{InstanceID: r.InstanceID, ReleasedAt: r.ReleasedAt, Releases: r.Releases,
			RevokedAt: r.RevokedAt, Reason: r.Reason})
	}
	return out
}
