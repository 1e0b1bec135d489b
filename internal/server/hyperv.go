package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/backend/hyperv"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
)

// Hyper-V and key-manager error codes.
const (
	CodeNotHyperV         = "not_hyperv"
	CodeVTPMKeyMissing    = "vtpm_key_missing"
	CodeTooManyHyperVKeys = "too_many_hyperv_keys"
	CodeInvalidPayload    = "invalid_payload"
)

// maxHyperVKeys: the owner guardian's signing and encryption certificates.
const maxHyperVKeys = 2

// HyperVOptions shape Hyper-V plans.
type HyperVOptions struct {
	// PublicURL is vtpmd's API as Hyper-V hosts reach it.
	PublicURL string
	// HGS is the Host Guardian Service's URL; "" for local key protectors.
	HGS string
}

// checkVTPMKeys makes sure each os_vtpm_keys secret is a secret a tenant
// stored, still in the key manager, and project's, saying which is not;
// it never reveals a payload. Another project's secret answers as an
// absent one does, so that the answer tells nothing of other projects.
func (s *Server) checkVTPMKeys(ctx context.Context, project string, keys []string) error {
	if len(keys) > maxHyperVKeys {
		return apiErr(http.StatusConflict, CodeTooManyHyperVKeys, fmt.Sprintf(
			"os_vtpm_keys names %d secrets; on Hyper-V vtpmd uses at most %d: the owner guardian's signing certificate and, optionally, its encryption certificate.", len(keys), maxHyperVKeys))
	}
	for _, id := range keys {
		sec, err := s.userSecret(ctx, id)
		var ae *APIError
		switch {
		case errors.As(err, &ae) && ae.Status == http.StatusNotFound, err == nil && sec.Project != project:
			return apiErr(http.StatusConflict, CodeVTPMKeyMissing, "The os_vtpm_keys secret "+id+" is not a secret of project "+project+" in the key manager.")
		case err != nil:
			return err
		}
	}
	return nil
}

// userSecret reads a secret a tenant stored through the API; a vTPM's own
// secret is not one, and is "not found" here.
func (s *Server) userSecret(ctx context.Context, id string) (keyring.Secret, error) {
	if !keyring.ValidID(id) {
		return keyring.Secret{}, apiErr(http.StatusBadRequest, CodeInvalidParameter, "A secret id is a UUID.")
	}
	notFound := apiErr(http.StatusNotFound, CodeNotFound, "No such secret.")
	err := s.Store.View(ctx, func(tx *store.Tx) error { _, err := tx.SecretProject(id); return err })
	if errors.Is(err, store.ErrNotFound) {
		return keyring.Secret{}, notFound
	}
	if err != nil {
		return keyring.Secret{}, err
	}
	sec, err := s.Keyring.Get(ctx, id)
	if errors.Is(err, keyring.ErrNotFound) {
		return sec, notFound
	}
	return sec, err
}

// hypervPlan answers the PowerShell plan for a Hyper-V vTPM, after checking
// its keys again (they may have been deleted since it was created).
func (s *Server) hypervPlan(w http.ResponseWriter, r *http.Request) error {
	v, _, err := s.lookup(r)
	if err != nil {
		return err
	}
	if v.Spec.Hypervisor != spec.HyperV {
		return apiErr(http.StatusConflict, CodeNotHyperV, "This vTPM is not a Hyper-V vTPM (the image's hypervisor_type is not hyperv).")
	}
	if err := s.checkVTPMKeys(r.Context(), v.Project, v.Spec.Keys); err != nil {
		return err
	}
	vmName := r.URL.Query().Get("vm_name")
	if vmName == "" {
		vmName = v.InstanceID
	}
	p := hyperv.Plan{InstanceID: v.InstanceID, VMName: vmName, Host: v.Host, Server: s.HyperV.PublicURL, Keys: v.Spec.Keys, HGS: s.HyperV.HGS}
	out := api.HyperVPlan{InstanceID: v.InstanceID, Host: v.Host, VMName: vmName, Keys: slices.Clone(v.Spec.Keys), KeyProtector: "local", Script: p.Script()}
	if out.Keys == nil {
		out.Keys = []string{}
	}
	if p.HGS != "" {
		out.KeyProtector = "hgs"
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// createSecret stores key material for a project.
func (s *Server) createSecret(w http.ResponseWriter, r *http.Request) error {
	scope, err := project(r)
	if err != nil {
		return err
	}
	var req api.CreateSecretRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	if req.Project, err = owningProject(scope, req.Project, "secrets", true); err != nil {
		return err
	}
	if len(req.Payload) == 0 || len(req.Payload) > keyring.MaxPayloadLen {
		return apiErr(http.StatusBadRequest, CodeInvalidPayload, fmt.Sprintf("The payload must be 1 to %d bytes; it is %d.", keyring.MaxPayloadLen, len(req.Payload)))
	}
	// Recorded as a tenant's, or it would be taken for an orphan vTPM secret.
	id, err := keyring.CreateRecorded(r.Context(), s.Keyring, req.Project, []byte(req.Payload), func(id string) error {
		return s.Store.Update(r.Context(), func(tx *store.Tx) error { return tx.AddSecret(id, req.Project) })
	})
	if err != nil {
		return err
	}
	sec, err := s.Keyring.Get(r.Context(), id)
	if err != nil {
		return err
	}
	w.Header().Set("Location", "/v1/secrets/"+id)
	writeJSON(w, http.StatusCreated, api.Secret{ID: id, Project: sec.Project, CreatedAt: sec.Created})
	return nil
}

// getSecret shows a secret's metadata to its project (or the operator).
func (s *Server) getSecret(w http.ResponseWriter, r *http.Request) error {
	scope, err := project(r)
	if err != nil {
		return err
	}
	sec, err := s.userSecret(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	if scope != "" && sec.Project != scope {
		return apiErr(http.StatusNotFound, CodeNotFound, "No such secret.")
	}
	writeJSON(w, http.StatusOK, api.Secret{ID: sec.ID, Project: sec.Project, CreatedAt: sec.Created})
	return nil
}

// secretPayload releases a secret to a host, with the host's credential,
// only when an instance placed on that host names it in os_vtpm_keys.
func (s *Server) secretPayload(w http.ResponseWriter, r *http.Request) error {
	hash, ok := bearerHash(r)
	if !ok {
		return apiErr(http.StatusUnauthorized, CodeUnauthenticated, "A host fetches keys with its credential (Authorization: Bearer; vtpmctl hyperv host-token).")
	}
	sec, err := s.userSecret(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	var host string
	var needed bool
	err = s.Store.View(r.Context(), func(tx *store.Tx) error {
		h, err := tx.HostByCredential(hash)
		if err != nil {
			return err
		}
		host = h
		vs, err := tx.ListVTPMs(store.Filter{Host: host})
		if err != nil {
			return err
		}
		needed = slices.ContainsFunc(vs, func(v *store.VTPM) bool { return v.Project == sec.Project && slices.Contains(v.Spec.Keys, sec.ID) })
		return nil
	})
	switch {
	case errors.Is(err, store.ErrNotFound):
		return apiErr(http.StatusUnauthorized, CodeUnauthenticated, "The credential is not a host's.")
	case err != nil:
		return err
	case !needed:
		return apiErr(http.StatusForbidden, CodeForbidden, "No instance on host "+host+" names this secret in os_vtpm_keys.")
	}
	s.Log.Info("secret released to host", "secret", sec.ID, "host", host)
	writeJSON(w, http.StatusOK, api.SecretPayload{ID: sec.ID, Payload: string(sec.Payload)})
	return nil
}

// hostCredential gives a host a new key-manager credential (replacing its
// old one); the operator, alone (see routes), installs it on the host.
func (s *Server) hostCredential(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	token, hash, err := newBearer()
	if err != nil {
		return err
	}
	out := api.HostCredential{Host: name, Token: token}
	err = s.Store.Update(r.Context(), func(tx *store.Tx) error {
		if _, err := tx.GetHost(name); err != nil {
			return err
		}
		return tx.PutHostCredential(name, hash)
	})
	if errors.Is(err, store.ErrNotFound) {
		return apiErr(http.StatusNotFound, CodeNotFound, "No such host.")
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, out)
	return nil
}
