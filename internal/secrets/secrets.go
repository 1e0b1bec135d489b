// Package secrets keeps the key material tenants store through the API (a
// Hyper-V owner guardian's certificates, named by a vTPM's os_vtpm_keys),
// the hosts' key-manager credentials, and the rule by which a key is
// released to a host: only to the host of an instance that names it.
//
// A tenant's secret lives in the key manager and its record (whose it is)
// in the store; keyring.CreateRecorded makes the two in the order that
// keeps them consistent. A vTPM's own secret is not a tenant's: it reads
// as absent here. Tenants' secrets are the deployment's in the key manager
// (with Barbican: in vtpmd's service project, named by the UUID Barbican
// gave them), so that vtpmd can release one to a host with no tenant's
// token at hand; the store records whose each is.
package secrets

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/bearer"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// maxHyperVKeys is how many os_vtpm_keys a Hyper-V vTPM uses: the owner
// guardian's signing and, optionally, encryption certificates.
const maxHyperVKeys = 2

// Service keeps tenants' secrets and hosts' credentials.
type Service struct {
	store   *store.Store
	keyring keyring.Keyring
	log     *slog.Logger
}

// New returns a Service on st and kr; log (nil: silent) records each key
// released to a host, never the key.
func New(st *store.Store, kr keyring.Keyring, log *slog.Logger) *Service {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Service{store: st, keyring: kr, log: log}
}

// Create stores payload as a secret of the project the caller names (or
// its own), recorded as a tenant's: otherwise it would be taken for an
// orphan vTPM secret and reclaimed. It returns the secret's metadata.
func (s *Service) Create(ctx context.Context, c tenant.Caller, project string, payload []byte) (keyring.Secret, error) {
	project, err := c.Owner(project, "secrets", true)
	if err != nil {
		return keyring.Secret{}, err
	}
	if len(payload) == 0 || len(payload) > keyring.MaxPayloadLen {
		return keyring.Secret{}, refusal.Invalid(api.CodeInvalidPayload,
			fmt.Sprintf("The payload must be 1 to %d bytes; it is %d.", keyring.MaxPayloadLen, len(payload)))
	}
	ctx = keyring.AsService(ctx)
	id, err := keyring.CreateRecorded(ctx, s.keyring, project, "", payload, func(id string) error {
		return s.store.Update(ctx, func(tx *store.Tx) error { return tx.AddSecret(id, project) })
	})
	if err != nil {
		return keyring.Secret{}, err
	}
	sec, err := s.keyring.Get(ctx, id)
	sec.Project = project
	return metadata(sec), err
}

// Get reads a tenant's secret's metadata, as the caller may see it.
func (s *Service) Get(ctx context.Context, c tenant.Caller, id string) (keyring.Secret, error) {
	sec, err := s.tenants(ctx, id)
	if err == nil && !c.Sees(sec.Project) {
		return keyring.Secret{}, errNoSuchSecret
	}
	return metadata(sec), err
}

// metadata is sec without its payload.
func metadata(sec keyring.Secret) keyring.Secret {
	sec.Payload = nil
	return sec
}

var errNoSuchSecret = refusal.NotFound(api.CodeNotFound, "No such secret.")

// tenants reads a secret a tenant stored, payload and all; a vTPM's own
// secret is not one, and is not found.
func (s *Service) tenants(ctx context.Context, id string) (keyring.Secret, error) {
	if !keyring.ValidID(id) {
		return keyring.Secret{}, refusal.Invalid(api.CodeInvalidParameter, "A secret id is a UUID.")
	}
	var project string
	err := s.store.View(ctx, func(tx *store.Tx) (err error) { project, err = tx.SecretProject(id); return err })
	if errors.Is(err, store.ErrNotFound) {
		return keyring.Secret{}, errNoSuchSecret
	}
	if err != nil {
		return keyring.Secret{}, err
	}
	sec, err := s.keyring.Get(keyring.AsService(ctx), id)
	if errors.Is(err, keyring.ErrNotFound) {
		return sec, errNoSuchSecret
	}
	sec.Project = project
	return sec, err
}

// CheckVTPMKeys makes sure each of a Hyper-V vTPM's os_vtpm_keys is a
// secret a tenant stored, still in the key manager, and project's, saying
// which is not; it never reveals a payload. Another project's secret
// answers as an absent one does, so that the answer tells nothing of
// other projects.
func (s *Service) CheckVTPMKeys(ctx context.Context, project string, keys []string) error {
	if len(keys) > maxHyperVKeys {
		return refusal.Conflict(api.CodeTooManyHyperVKeys, fmt.Sprintf(
			"os_vtpm_keys names %d secrets; on Hyper-V vtpmd uses at most %d: the owner guardian's signing certificate and, optionally, its encryption certificate.", len(keys), maxHyperVKeys))
	}
	for _, id := range keys {
		sec, err := s.tenants(ctx, id)
		var r *refusal.Error
		switch {
		case errors.As(err, &r) && r.Kind == refusal.KindNotFound, err == nil && sec.Project != project:
			return refusal.Conflict(api.CodeVTPMKeyMissing, "The os_vtpm_keys secret "+id+" is not a secret of project "+project+" in the key manager.")
		case err != nil:
			return err
		}
	}
	return nil
}

// Release gives a secret to a host, which proves itself with its
// credential (hostToken), only when an instance placed on that host names
// the secret in os_vtpm_keys. The release is logged, never the key.
func (s *Service) Release(ctx context.Context, id, hostToken string) (keyring.Secret, error) {
	if hostToken == "" {
		return keyring.Secret{}, refusal.Unauthenticated(api.CodeUnauthenticated, "A host fetches keys with its credential (Authorization: Bearer; vtpmctl hyperv host-token).")
	}
	sec, err := s.tenants(ctx, id)
	if err != nil {
		return keyring.Secret{}, err
	}
	var host string
	var needed bool
	err = s.store.View(ctx, func(tx *store.Tx) error {
		h, err := tx.HostByCredential(bearer.Hash(hostToken))
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
		return keyring.Secret{}, refusal.Unauthenticated(api.CodeUnauthenticated, "The credential is not a host's.")
	case err != nil:
		return keyring.Secret{}, err
	case !needed:
		return keyring.Secret{}, refusal.Forbidden(api.CodeForbidden, "No instance on host "+host+" names this secret in os_vtpm_keys.")
	}
	s.log.Info("secret released to host", "secret", sec.ID, "host", host)
	return sec, nil
}

// HostCredential gives a host a new key-manager credential, replacing its
// old one, and returns the token, which is shown this once.
func (s *Service) HostCredential(ctx context.Context, host string) (string, error) {
	token, hash, err := bearer.New()
	if err != nil {
		return "", err
	}
	err = s.store.Update(ctx, func(tx *store.Tx) error {
		if _, err := tx.GetHost(host); err != nil {
			return err
		}
		return tx.PutHostCredential(host, hash)
	})
	if errors.Is(err, store.ErrNotFound) {
		return "", refusal.NotFound(api.CodeNotFound, "No such host.")
	}
	return token, err
}
