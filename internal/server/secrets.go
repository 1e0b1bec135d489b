package server

import (
	"net/http"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keyring"
)

// createSecret stores key material for a project; the answer never
// carries it.
func (s *Server) createSecret(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	var req api.CreateSecretRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	sec, err := s.Secrets.Create(r.Context(), c, req.Project, []byte(req.Payload))
	if err != nil {
		return err
	}
	w.Header().Set("Location", "/v1/secrets/"+sec.ID)
	writeJSON(w, http.StatusCreated, secretView(sec))
	return nil
}

// getSecret shows a secret's metadata to its project (or the operator).
func (s *Server) getSecret(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	sec, err := s.Secrets.Get(r.Context(), c, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, secretView(sec))
	return nil
}

func secretView(sec keyring.Secret) api.Secret {
	return api.Secret{ID: sec.ID, Project: sec.Project, CreatedAt: sec.Created}
}

// secretPayload releases a secret to a host, which sends its credential
// (secrets.Service.Release says to whom).
func (s *Server) secretPayload(w http.ResponseWriter, r *http.Request) error {
	sec, err := s.Secrets.Release(r.Context(), r.PathValue("id"), bearerToken(r))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.SecretPayload{ID: sec.ID, Payload: string(sec.Payload)})
	return nil
}

// hostCredential gives a host a new key-manager credential (replacing its
// old one); the operator, alone (see routes), installs it on the host.
func (s *Server) hostCredential(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	token, err := s.Secrets.HostCredential(r.Context(), name)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, api.HostCredential{Host: name, Token: token})
	return nil
}

// hypervPlan answers the PowerShell plan for a Hyper-V vTPM.
func (s *Server) hypervPlan(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	p, err := s.VTPMs.HyperVPlan(r.Context(), c, r.PathValue("id"), r.URL.Query().Get("vm_name"))
	if err != nil {
		return err
	}
	out := api.HyperVPlan{InstanceID: p.InstanceID, Host: p.Host, VMName: p.VMName, Keys: p.Keys, KeyProtector: "local", Script: p.Script()}
	if out.Keys == nil {
		out.Keys = []string{}
	}
	if p.HGS != "" {
		out.KeyProtector = "hgs"
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}
