// Package broker is vtpmd's attestation-gated key broker: a tenant's
// secret reaches an instance only while the instance and its host are
// trusted, only inside that instance's vTPM (wrapped by
// internal/keyrelease), and the instance learns at once when it must let
// it go (revocation, in internal/verifier where verdicts change). See
// docs/key-broker.md.
package broker

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keyrelease"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
)

// Release conditions' defaults and bounds.
const (
	// DefaultMaxEvidenceAge is how old an instance's and its host's last
	// genuine evidence may be at a release, unless the secret says: four
	// of the guest agent's default 30 s rounds.
	DefaultMaxEvidenceAge = 2 * time.Minute
	maxMaxEvidenceAge     = time.Hour
)

// Config is what a Service works with.
type Config struct {
	Store   *store.Store
	Keyring keyring.Keyring
	// Verifier judges the instances (Gate) and names their policies.
	Verifier *verifier.Verifier
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Log (nil: silent) records each release and refusal, never a payload.
	Log *slog.Logger
}

// Service keeps the broker's secrets and releases them.
type Service struct{ cfg Config }

// New returns a Service with cfg.
func New(cfg Config) *Service {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Service{cfg: cfg}
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

func checkName(name string) error {
	if !nameRE.MatchString(name) {
		return refusal.Invalid(api.CodeInvalidParameter, "A secret's name is a letter or digit, then up to 63 letters, digits, '_', '.' and '-'; not "+refusal.Quote(name)+".")
	}
	return nil
}

func noSuchSecret(name string) error {
	return refusal.NotFound(api.CodeNotFound, "No secret named "+refusal.Quote(name)+".")
}

// Create stores a secret of the project the caller names (or its own):
// the payload in the key manager, the release conditions in the store
// (keyring.CreateRecorded makes the two in the order that keeps them
// consistent). The instances it names must be canonical instance ids (they
// need not exist yet); the policy must exist.
func (s *Service) Create(ctx context.Context, c tenant.Caller, req api.CreateBrokerSecretRequest) (*store.BrokerSecret, error) {
	project, err := c.Owner(req.Project, "secrets", true)
	if err != nil {
		return nil, err
	}
	if err := checkName(req.Name); err != nil {
		return nil, err
	}
	if len(req.Payload) == 0 || len(req.Payload) > keyrelease.MaxPayload {
		return nil, refusal.Invalid(api.CodeInvalidPayload, fmt.Sprintf("The payload must be 1 to %d bytes; it is %d.", keyrelease.MaxPayload, len(req.Payload)))
	}
	if len(req.ReleaseTo) == 0 && req.Policy == "" {
		return nil, refusal.Invalid(api.CodeInvalidParameter, "Say whom the secret is for: release_to (instances), policy (instances judged by it), or both.")
	}
	sec := &store.BrokerSecret{Project: project, Name: req.Name, Policy: req.Policy, MaxEvidenceAge: DefaultMaxEvidenceAge}
	for _, id := range req.ReleaseTo {
		id, err := vtpms.ParseInstanceID(id)
		if err != nil {
			return nil, err
		}
		if !slices.Contains(sec.ReleaseTo, id) {
			sec.ReleaseTo = append(sec.ReleaseTo, id)
		}
	}
	if req.MaxEvidenceAge != "" {
		d, err := time.ParseDuration(req.MaxEvidenceAge)
		if err != nil || d < time.Second || d > maxMaxEvidenceAge {
			return nil, refusal.Invalid(api.CodeInvalidParameter, "max_evidence_age is a duration from 1s to 1h, such as \"90s\"; not "+refusal.Quote(req.MaxEvidenceAge)+".")
		}
		sec.MaxEvidenceAge = d
	}
	if req.Policy != "" {
		p, err := s.cfg.Verifier.Policy(ctx, tenant.Caller{Project: project}, project, req.Policy)
		if err != nil {
			return nil, err
		}
		sec.PolicyID = p.ID
	}
	ctx = keyring.AsService(ctx)
	_, err = keyring.CreateRecorded(ctx, s.cfg.Keyring, project, "", req.Payload, func(id string) error {
		sec.KeyID = id
		return s.cfg.Store.Update(ctx, func(tx *store.Tx) error { return tx.CreateBrokerSecret(sec) })
	})
	if errors.Is(err, store.ErrExists) {
		return nil, refusal.Conflict(api.CodeAlreadyExists, "The project has a secret named "+refusal.Quote(req.Name)+".")
	}
	return sec, err
}

// project is the project a read or delete addresses: the caller's, or for
// the operator the one it asks for.
func project(c tenant.Caller, asked string) (string, error) {
	if c.Project != "" {
		return c.Project, nil
	}
	if asked == "" {
		return "", refusal.Invalid(api.CodeInvalidProject, "A project is required: set ?project= or the "+api.ProjectHeader+" header.")
	}
	return asked, nil
}

// Get reads a secret of the caller's project (the operator's: the one it
// asks for) with its releases.
func (s *Service) Get(ctx context.Context, c tenant.Caller, asked, name string) (*store.BrokerSecret, []store.Release, error) {
	p, err := project(c, asked)
	if err != nil {
		return nil, nil, err
	}
	var sec *store.BrokerSecret
	var rs []store.Release
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) {
		if sec, err = tx.GetBrokerSecret(p, name); errors.Is(err, store.ErrNotFound) {
			return noSuchSecret(name)
		} else if err != nil {
			return err
		}
		rs, err = tx.ListReleases(p, name)
		return err
	})
	return sec, rs, err
}

// List lists the caller's project's secrets (the operator's: every
// project's).
func (s *Service) List(ctx context.Context, c tenant.Caller) ([]*store.BrokerSecret, error) {
	var out []*store.BrokerSecret
	err := s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { out, err = tx.ListBrokerSecrets(c.Project); return err })
	return out, err
}

// Delete removes a secret and shreds its payload; the instances it was
// released to keep what they hold (a revocation is the broker's word for
// a verdict, not for a delete), but get it no more.
func (s *Service) Delete(ctx context.Context, c tenant.Caller, asked, name string) error {
	p, err := project(c, asked)
	if err != nil {
		return err
	}
	return keyring.ShredRecorded(keyring.AsService(ctx), s.cfg.Keyring, func() ([]string, error) {
		var sec *store.BrokerSecret
		err := s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
			sec, err = tx.DeleteBrokerSecret(p, name)
			if errors.Is(err, store.ErrNotFound) {
				return noSuchSecret(name)
			}
			return err
		})
		if err != nil {
			return nil, err
		}
		return []string{sec.KeyID}, nil
	})
}

// Release answers the registered agent of instance id (agentToken is
// its bearer token; c the request's caller, an agent's seeing every
// project) with secret name of the instance's project, wrapped for the
// instance's vTPM (Wrap), if at this moment:
//
//  1. the instance has a vTPM c sees (not_found), it is registered, and
//     the token is its agent's (not_registered, unauthenticated:
//     verifier.Gate);
//  2. its vTPM is not being deleted (instance_deleted);
//  3. its project has a secret of that name (not_found: another project's
//     reads as absent);
//  4. the secret is for it: among release_to when that is set, and judged
//     by the secret's policy when it names one (release_not_allowed);
//  5. its overall verdict (its own, its vTPM's provenance, its host's) is
//     trusted (not_trusted, with the reason);
//  6. its and its host's last genuine evidence are no older than the
//     secret's max_evidence_age (evidence_too_old).
//
// The checks and the record of the outcome are one transaction, which
// reads the vTPM, the attestation records (without their logs) and the
// secret once each, so a verdict change or a delete cannot slip between
// them: a release is recorded (and revoked by the next change that leaves
// the instance untrusted), a refusal from 2 on too; each is an event of
// the instance. A caller that is not the agent (1) writes nothing. A key
// manager that keeps its secrets in the store (the embedded one) gives the
// payload in that transaction too; another after it commits.
func (s *Service) Release(ctx context.Context, c tenant.Caller, id, agentToken, name string) (api.WrappedSecret, error) {
	id, err := vtpms.ParseInstanceID(id)
	if err != nil {
		return api.WrappedSecret{}, err
	}
	out := api.WrappedSecret{Name: name, InstanceID: id, ReleaseID: uuid.NewString()}
	var refused error
	var sec *store.BrokerSecret
	var g *verifier.Gate
	var sk keyring.Secret
	inStore, payloadInStore := s.cfg.Keyring.(storeKeyring)
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		clear(sk.Payload) // of a try PostgreSQL made run again
		if g, err = s.cfg.Verifier.Gate(tx, c, id, agentToken); err != nil {
			return err // nobody proved to be the agent: nothing is recorded
		}
		vt := g.VTPM
		if vt.Desired == store.DesiredDeleted || vt.Phase == store.PhaseDeleting {
			refused = refusal.Conflict(api.CodeInstanceDeleted, "Instance "+vt.InstanceID+" is being deleted.")
			return s.refusal(tx, vt, name, refused)
		}
		if refused = s.check(tx, g, name, &sec); refused != nil {
			return s.refusal(tx, vt, name, refused)
		}
		if payloadInStore {
			if sk, err = inStore.GetIn(tx, sec.KeyID); err != nil {
				return fmt.Errorf("reading secret %s of project %s: %w", name, vt.Project, err)
			}
		}
		if err := tx.RecordRelease(vt.Project, name, vt.InstanceID, vt.Incarnation); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: "attestation agent", InstanceID: vt.InstanceID, Action: "secret released",
			Detail: name + " (release " + out.ReleaseID + ")"})
	})
	defer func() { clear(sk.Payload) }()
	if err == nil {
		err = refused
	}
	if err != nil {
		return api.WrappedSecret{}, err
	}
	vt := g.VTPM
	if !payloadInStore {
		if sk, err = s.cfg.Keyring.Get(keyring.AsService(ctx), sec.KeyID); err != nil {
			return api.WrappedSecret{}, fmt.Errorf("reading secret %s of project %s: %w", name, vt.Project, err)
		}
	}
	ek, err := x509.ParsePKIXPublicKey(g.EK.PublicDER)
	if err != nil {
		return api.WrappedSecret{}, fmt.Errorf("the EK of instance %s: %w", vt.InstanceID, err)
	}
	akName, err := objectName(g.AKPublic)
	if err != nil {
		return api.WrappedSecret{}, fmt.Errorf("the AK of instance %s: %w", vt.InstanceID, err)
	}
	w, err := keyrelease.Wrap(ek, akName, keyrelease.Binding(vt.InstanceID, vt.Incarnation, name, out.ReleaseID), sk.Payload)
	if err != nil {
		return api.WrappedSecret{}, err
	}
	out.EKHandle, out.Wrapped = fmt.Sprintf("0x%08x", g.EK.Handle), w.Marshal()
	s.cfg.Log.Info("secret released", "instance", vt.InstanceID, "project", vt.Project, "secret", name, "release", out.ReleaseID)
	return out, nil
}

// storeKeyring is a key manager that keeps its secrets in vtpmd's store
// (internal/keyring/embedded): GetIn opens one in a transaction of the
// store, keyring.ErrNotFound if it has none.
type storeKeyring interface {
	GetIn(tx *store.Tx, id string) (keyring.Secret, error)
}

// check applies the release conditions 3 to 6 (see Release) to g, reading
// the secret into *sec.
func (s *Service) check(tx *store.Tx, g *verifier.Gate, name string, sec **store.BrokerSecret) error {
	vt, st := g.VTPM, g.Status
	got, err := tx.GetBrokerSecret(vt.Project, name)
	if errors.Is(err, store.ErrNotFound) {
		return noSuchSecret(name)
	}
	if err != nil {
		return err
	}
	*sec = got
	if len(got.ReleaseTo) > 0 && !slices.Contains(got.ReleaseTo, vt.InstanceID) {
		return refusal.Forbidden(api.CodeReleaseNotAllowed, "Secret "+refusal.Quote(name)+" is not released to instance "+vt.InstanceID+".")
	}
	switch {
	case got.Policy == "" || g.PolicyID == got.PolicyID:
	case st.Policy == got.Policy:
		// The name is the same, the policy is not: the project's own and
		// the shared one, or one made again since the secret was.
		return refusal.Forbidden(api.CodeReleaseNotAllowed, "Secret "+refusal.Quote(name)+" is released to instances judged by the policy "+
			refusal.Quote(got.Policy)+" it was made with; instance "+vt.InstanceID+" is judged by another policy of that name (the shared one, or one made again since). Make the secret again to release it under that policy.")
	default:
		return refusal.Forbidden(api.CodeReleaseNotAllowed, "Secret "+refusal.Quote(name)+" is released to instances judged by policy "+
			refusal.Quote(got.Policy)+"; instance "+vt.InstanceID+" is not.")
	}
	if st.Overall != store.VerdictTrusted {
		return refusal.Forbidden(api.CodeNotTrusted, "Instance "+vt.InstanceID+" is not trusted: "+st.Summary+".")
	}
	now := s.cfg.Now()
	for _, e := range []struct {
		what string
		at   time.Time
	}{{"the instance's", g.EvidenceAt}, {"its host's", g.HostEvidenceAt}} {
		if age := now.Sub(e.at); age > got.MaxEvidenceAge {
			return refusal.Conflict(api.CodeEvidenceTooOld, fmt.Sprintf("%s last evidence is %s old; secret %s needs it at most %s old: attest again.",
				e.what, age.Round(time.Second), refusal.Quote(name), got.MaxEvidenceAge))
		}
	}
	return nil
}

// refusal records a refused release as an event of the instance.
func (s *Service) refusal(tx *store.Tx, vt *store.VTPM, name string, why error) error {
	s.cfg.Log.Info("secret release refused", "instance", vt.InstanceID, "project", vt.Project, "secret", refusal.Truncate(name), "err", why)
	return tx.AppendEvent(store.Event{Actor: "attestation agent", InstanceID: vt.InstanceID, Action: "secret refused",
		Detail: refusal.Truncate(name) + ": " + why.Error()})
}

// objectName is the TPM name of a registered AK's TPM2B_PUBLIC (which
// registration checked: a SHA-256-named public area): nameAlg followed by
// SHA-256 of the public area as marshalled (TPM 2.0 Part 1, 16 "Names").
// The area's bytes are hashed as they are, without parsing them again.
func objectName(tpm2bPublic []byte) ([]byte, error) {
	if len(tpm2bPublic) < 6 || int(binary.BigEndian.Uint16(tpm2bPublic)) != len(tpm2bPublic)-2 {
		return nil, errors.New("not a TPM2B_PUBLIC")
	}
	area := tpm2bPublic[2:]
	if alg := binary.BigEndian.Uint16(area[2:]); alg != uint16(tpm2.TPMAlgSHA256) {
		return nil, fmt.Errorf("the AK is named with algorithm %#x, not SHA-256", alg)
	}
	sum := sha256.Sum256(area)
	return append(binary.BigEndian.AppendUint16(nil, uint16(tpm2.TPMAlgSHA256)), sum[:]...), nil
}
