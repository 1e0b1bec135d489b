package vtpms

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// adoptedAction is the event that starts the history of an adopted vTPM.
const adoptedAction = "adopted"

// Adopt takes over the vTPM Nova made for instance rawID (the
// operator's): libvirt's encrypted emulator TPM of domain req.Domain, its
// state where libvirt keeps it (by domain UUID, which must be the instance
// id, as under Nova) and its key in the key manager, under Nova's
// vtpm_secret_uuid. Nothing of it is rewritten and no secret is made.
//
// The request reaches the agent of req.Host, or of every libvirt host that
// is up, through its watch, as a drift check does; the agent that has the
// domain reads the vTPM's spec and secret reference from the domain, gets
// the secret's payload (agentstore.Records.AdoptionSecret), opens a copy of
// the state with it, reads the endorsement keys and records them beside
// the state. Then one transaction records the vTPM on that host (with the
// domain, the secret and the EKs; desired running if the guest runs,
// stopped if not), and from then on it is a vTPM like any other: its
// agent starts, stops and deletes it, and it attests against those EKs.
//
// Every refusal leaves no record: domain_not_found, no_vtpm,
// vtpm_state_not_found, already_managed, secret_not_found, wrong_secret,
// secret_needs_owner (the key manager refused vtpmd's service identity the
// secret: another project's, with no ACL for it), adoption_failed (the
// agent's fault), host_unavailable (no answer within Config.DriftTimeout);
// with a caller-scoped key manager, invalid_parameter without a project. Asking again is safe: a vTPM this adoption
// recorded already is returned as it is (made false).
func (s *Service) Adopt(ctx context.Context, c tenant.Caller, rawID string, req api.AdoptRequest) (v *store.VTPM, made bool, err error) {
	id, err := ParseInstanceID(rawID)
	if err != nil {
		return nil, false, err
	}
	if !domainRE.MatchString(req.Domain) {
		return nil, false, refusal.Invalid(api.CodeInvalidParameter, "Domain "+refusal.Quote(req.Domain)+
			" is not a valid libvirt domain name (letters, digits, '_', '.', '+', '-'; at most 128).")
	}
	if req.SecretRef != "" && !keyring.ValidID(req.SecretRef) {
		return nil, false, refusal.Invalid(api.CodeInvalidParameter, "secret_ref is a lowercase UUID (Nova's vtpm_secret_uuid).")
	}
	project, err := c.Owner(req.Project, "vTPMs", false)
	if err != nil {
		return nil, false, err
	}
	if cs, ok := s.cfg.Keyring.(keyring.CallerScoped); ok && cs.ScopedToCaller() && project == "" {
		return nil, false, refusal.Invalid(api.CodeInvalidParameter, "Name the instance's project (project, vtpmctl adopt --project): "+
			"the key manager does not tell a reader which project a secret is in, and Nova's deployment mode keeps it in Nova's own.")
	}
	if v, err := s.adopted(ctx, id, req); v != nil || err != nil {
		return v, false, err
	}
	hosts, err := s.adoptionHosts(ctx, req.Host)
	if err != nil {
		return nil, false, err
	}

	asks := make([]*store.Adoption, len(hosts))
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		if err := tx.WithdrawAdoptions(id); err != nil {
			return err
		}
		for i, h := range hosts {
			asks[i] = &store.Adoption{Host: h, InstanceID: id, Domain: req.Domain, SecretID: req.SecretRef}
			if err := tx.AskAdoption(asks[i]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	defer s.cfg.Store.Update(context.WithoutCancel(ctx), func(tx *store.Tx) error { return tx.WithdrawAdoptions(id) })

	host, found, err := s.awaitAdoption(ctx, asks)
	if err != nil {
		return nil, false, err
	}
	if project == "" {
		// The secret's project, which a key manager that is not
		// caller-scoped records (a caller-scoped one was refused above).
		sec, err := s.cfg.Keyring.Get(keyring.AsService(ctx), found.SecretRef)
		if errors.Is(err, keyring.ErrNotFound) {
			return nil, false, refusal.NotFound(api.CodeSecretNotFound, "The key manager has no secret "+found.SecretRef+".")
		}
		if err != nil {
			return nil, false, err
		}
		project = sec.Project
	}
	sp, err := s.adoptedSecurity(ctx, spec.FromAPI(found.Spec), found.SecretRef)
	if err != nil {
		return nil, false, err
	}
	v = &store.VTPM{InstanceID: id, Project: project, Spec: sp, Host: host, Domain: req.Domain,
		SecretID: found.SecretRef, Desired: store.DesiredStopped, Phase: store.PhasePending}
	if found.Running {
		v.Desired = store.DesiredRunning
	}
	for _, ek := range found.EKs {
		v.EKs = append(v.EKs, store.EK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: ek.Public, CertDER: ek.Certificate})
	}
	err = s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		if err := NotManaged(tx, id, v.SecretID); err != nil {
			return err
		}
		if err := tx.CreateVTPM(v); err != nil {
			return err
		}
		return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: id, Action: adoptedAction,
			Detail: fmt.Sprintf("TPM %s %s of libvirt domain %s on host %s, keyed by secret %s", v.Spec.Version, v.Spec.Model, req.Domain, host, v.SecretID)})
	})
	if errors.Is(err, store.ErrExists) {
		return s.Adopt(ctx, c, id, req) // adopted meanwhile (converges), or made by a create: asked again
	}
	if err != nil {
		return nil, false, err
	}
	s.cfg.Log.Info("adopted vTPM", "instance", id, "domain", req.Domain, "host", host, "by", c.Actor)
	return v, true, nil
}

// adoptedSecurity is the secret security of an adopted vTPM of sp keyed
// by secretID. The host tells host (libvirt keeps the secret) from the
// others (an ephemeral libvirt secret, defined for each start), which
// Nova's user and deployment modes share; a key manager that keeps secrets
// under their owners' identities tells them apart: a secret in vtpmd's
// service project (Nova's, in deployment mode, when they share it) is the
// deployment's, one the service reads through an ACL stays its owner's.
func (s *Service) adoptedSecurity(ctx context.Context, sp spec.Spec, secretID string) (spec.Spec, error) {
	h, ok := s.cfg.Keyring.(keyring.ServiceHolder)
	if !ok || sp.SecretSecurity != spec.User || !OwnerHeld(s.cfg.Keyring, sp) {
		return sp, nil
	}
	held, err := h.ServiceHolds(keyring.AsService(ctx), secretID)
	if err != nil {
		return spec.Spec{}, err
	}
	if held {
		sp.SecretSecurity = spec.Deployment
	}
	return sp, nil
}

// adopted returns the vTPM of instance id if an adoption of req's domain
// (on req's host, with req's secret, when they are named) recorded it; it
// refuses with already_managed if vtpmd manages the instance's vTPM
// otherwise; nil if the instance has none.
func (s *Service) adopted(ctx context.Context, id string, req api.AdoptRequest) (v *store.VTPM, err error) {
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) error {
		if v, err = tx.GetVTPM(id); errors.Is(err, store.ErrNotFound) {
			v = nil
			return nil
		} else if err != nil {
			return err
		}
		evs, err := tx.ListEvents(id, v.Incarnation)
		if err != nil {
			return err
		}
		same := v.Domain == req.Domain && (req.Host == "" || req.Host == v.Host) && (req.SecretRef == "" || req.SecretRef == v.SecretID) &&
			v.Desired != store.DesiredDeleted && len(evs) > 0 && evs[0].Action == adoptedAction
		if !same {
			return refusal.Conflict(api.CodeAlreadyManaged, "vtpmd manages a vTPM of instance "+id+" already (domain "+
				refusal.Quote(v.Domain)+" on host "+v.Host+").")
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return v, nil
}

// NotManaged refuses, with already_managed, an adoption of instance id
// keyed by secretID if vtpmd manages the instance's vTPM or one keyed by
// the secret.
func NotManaged(tx *store.Tx, id, secretID string) error {
	if _, err := tx.GetVTPM(id); err == nil {
		return refusal.Conflict(api.CodeAlreadyManaged, "vtpmd manages a vTPM of instance "+id+" already.")
	} else if !errors.Is(err, store.ErrNotFound) {
		return err
	}
	if other, err := tx.SecretKeys(secretID); err == nil {
		return refusal.Conflict(api.CodeAlreadyManaged, "Secret "+secretID+" keys the vTPM of instance "+other+", which vtpmd manages already.")
	} else if !errors.Is(err, store.ErrNotFound) {
		return err
	}
	return nil
}

// adoptionHosts are the hosts to ask: the one named, which must run the
// libvirt backend, or every libvirt host that is up.
func (s *Service) adoptionHosts(ctx context.Context, name string) ([]string, error) {
	hosts, err := s.Hosts(ctx, name)
	if err != nil {
		return nil, err
	}
	if name != "" {
		switch {
		case len(hosts) == 0:
			return nil, refusal.NotFound(api.CodeNotFound, "No such host.")
		case hosts[0].Backend != "libvirt":
			return nil, refusal.Conflict(api.CodeNotSupported, "Host "+name+" runs the "+hosts[0].Backend+
				" backend; only libvirt hosts have Nova's vTPMs to take over.")
		}
		return []string{name}, nil
	}
	var out []string
	for _, h := range hosts {
		if h.Backend == "libvirt" && h.State == spec.HostUp {
			out = append(out, h.Name)
		}
	}
	if len(out) == 0 {
		return nil, refusal.NotFound(api.CodeDomainNotFound, "No libvirt host is up to have the domain.")
	}
	return out, nil
}

// awaitAdoption waits until every host asked answered, and returns the
// answer of the one that has the domain, or the refusal it answered;
// domain_not_found if none has it. A host that does not answer within
// Config.DriftTimeout is unavailable.
func (s *Service) awaitAdoption(ctx context.Context, asks []*store.Adoption) (host string, found *api.AgentAdoption, err error) {
	timeout := time.NewTimer(s.cfg.DriftTimeout)
	defer timeout.Stop()
	reread := time.NewTicker(driftReread)
	defer reread.Stop()
	answers := map[string]*api.AgentAdoption{}
	for {
		var waiting []string
		for _, a := range asks {
			if answers[a.Host] != nil {
				continue
			}
			var got *store.Adoption
			err := s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { got, err = tx.GetAdoption(a.Host, a.ID); return err })
			if err != nil {
				return "", nil, err // withdrawn: another adoption of the instance took over
			}
			if got.Answer == nil {
				waiting = append(waiting, a.Host)
				continue
			}
			var ans api.AgentAdoption
			if err := json.Unmarshal(got.Answer, &ans); err != nil {
				return "", nil, err
			}
			answers[a.Host] = &ans
		}
		if len(waiting) == 0 {
			return pickAdoption(asks, answers)
		}
		answered := s.cfg.Store.HostChanged(waiting[0])
		select {
		case <-ctx.Done():
			return "", nil, ctx.Err()
		case <-timeout.C:
			return "", nil, refusal.Unavailable(api.CodeHostUnavailable, fmt.Sprintf(
				"The agent of host %s did not answer within %s: is it running (vtpmctl hosts)?", strings.Join(waiting, ", "), s.cfg.DriftTimeout))
		case <-answered:
		case <-reread.C:
		}
	}
}

// pickAdoption is the answer of the one host that has the domain.
func pickAdoption(asks []*store.Adoption, answers map[string]*api.AgentAdoption) (string, *api.AgentAdoption, error) {
	var have []string
	for _, a := range asks {
		if answers[a.Host].Code != api.CodeDomainNotFound {
			have = append(have, a.Host)
		}
	}
	slices.Sort(have)
	switch len(have) {
	case 0:
		names := make([]string, len(asks))
		for i, a := range asks {
			names[i] = a.Host
		}
		return "", nil, refusal.NotFound(api.CodeDomainNotFound, fmt.Sprintf("No libvirt domain named %s on host %s.",
			refusal.Quote(asks[0].Domain), strings.Join(names, ", ")))
	case 1:
	default:
		return "", nil, refusal.Conflict(api.CodeConflict, fmt.Sprintf("Hosts %s each have a domain named %s: name the host.",
			strings.Join(have, ", "), refusal.Quote(asks[0].Domain)))
	}
	ans := answers[have[0]]
	if ans.Code != "" {
		return "", nil, agent.AdoptionFromAPI(*ans).Refusal
	}
	return have[0], ans, nil
}
