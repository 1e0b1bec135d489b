// Package vtpms is the desired state of vTPMs: a create resolves the
// flavor and image (internal/spec), places the vTPM on a host, makes its
// key-manager secret and records it; start, stop, attach, detach and
// delete change what the host's agent is to do, and the agent moves the
// vTPM's phase towards it. Every read and change is scoped to the caller's
// project (internal/tenant): another project's vTPM reads as absent.
//
// Hosts are the operator's. Each reads up, down (its agent's heartbeats
// stopped for longer than Config.HeartbeatWindow, by the injected clock)
// or draining (the operator's Drain); only an up host takes new vTPMs, and
// nothing is deleted or moved off a host that is down.
//
// Refusals are *refusal.Error; a missing record is store.ErrNotFound.
package vtpms

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/secrets"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// Config is what a Service works with.
type Config struct {
	Store   *store.Store
	Keyring keyring.Keyring
	// Staging keeps the secret of a vTPM whose owner holds it
	// (OwnerHeld) for the host's agent, sealed in the store, after the
	// owner's create or start read it; needed with such a key manager.
	Staging Stager
	// StageFor is how long a staged secret waits for the host's agent.
	// Default DefaultStageFor.
	StageFor time.Duration
	// Secrets checks the key material a Hyper-V vTPM names.
	Secrets *secrets.Service
	// Options are the deployment's request semantics.
	Options spec.Options
	// HyperV shapes Hyper-V plans.
	HyperV HyperVOptions
	// HeartbeatWindow is how long a host's agent may go without a
	// heartbeat before the host reads down and takes no new vTPMs;
	// default DefaultHeartbeatWindow. Its vTPMs stay: down never deletes
	// or moves one.
	HeartbeatWindow time.Duration
	// DriftTimeout is how long a drift check or an adoption waits for the
	// host's agent; default DefaultDriftTimeout.
	DriftTimeout time.Duration
	// BackupKeep is how many backups of each vTPM are kept (the newest);
	// default DefaultBackupKeep.
	BackupKeep int
	// Now is the clock hosts' heartbeats are judged by; default time.Now.
	Now func() time.Time
	// Log receives the operator's changes to hosts; nil: silent.
	Log *slog.Logger
}

// Stager seals a vTPM secret for its host's agent in a transaction, until
// a time (the embedded keyring: internal/keyring/embedded).
type Stager interface {
	Stage(tx *store.Tx, s keyring.Secret, until time.Time) error
}

// DefaultStageFor is how long a staged secret waits for the host's agent,
// which takes it within a second or two of the commit that staged it.
const DefaultStageFor = 2 * time.Minute

// OwnerHeld reports whether a vTPM of sp keeps its secret under its
// owner's identity in kr: secret security user or host, with a key manager
// that scopes secrets to the caller that stored them (Barbican). vtpmd
// alone then cannot read it: the owner's create and start stage it for the
// host's agent. With the embedded key manager every secret is vtpmd's.
func OwnerHeld(kr keyring.Keyring, sp spec.Spec) bool {
	cs, ok := kr.(keyring.CallerScoped)
	return ok && cs.ScopedToCaller() && (sp.SecretSecurity == spec.User || sp.SecretSecurity == spec.HostMode)
}

// asOwner is ctx for the key manager when the vTPM of sp in project is
// its owner's (OwnerHeld): the caller must have a token of that project,
// or it is refused with secret_needs_owner. Otherwise it is ctx as vtpmd's
// own service identity.
func (s *Service) asOwner(ctx context.Context, c tenant.Caller, project string, sp spec.Spec) (context.Context, error) {
	if !OwnerHeld(s.cfg.Keyring, sp) {
		return keyring.AsService(ctx), nil
	}
	if _, ok := keyring.Token(ctx); !ok || c.Project != project {
		return nil, refusal.Forbidden(api.CodeSecretNeedsOwner, fmt.Sprintf(
			"The vTPM's secret security is %s: its secret is kept in project %s's key manager and only a token of project %s can use it; an operator or another project cannot.",
			sp.SecretSecurity, project, project))
	}
	return ctx, nil
}

// DefaultHeartbeatWindow is six of the agents' default heartbeat intervals:
// a host reads down only after several missed heartbeats.
const DefaultHeartbeatWindow = 60 * time.Second

// Service creates, changes and reads vTPMs.
type Service struct {
	cfg      Config
	creating sync.Mutex   // see Create
	swept    atomic.Int64 // transfers SweepTransfers removed
}

// New returns a Service with cfg.
func New(cfg Config) *Service {
	if cfg.HeartbeatWindow == 0 {
		cfg.HeartbeatWindow = DefaultHeartbeatWindow
	}
	if cfg.StageFor == 0 {
		cfg.StageFor = DefaultStageFor
	}
	if cfg.DriftTimeout == 0 {
		cfg.DriftTimeout = DefaultDriftTimeout
	}
	if cfg.BackupKeep == 0 {
		cfg.BackupKeep = DefaultBackupKeep
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Service{cfg: cfg}
}

// ParseInstanceID validates an instance id: a canonical UUID, so it is safe
// as a directory name and a key. Upper-case hex is accepted and lowered.
func ParseInstanceID(raw string) (string, error) {
	id, err := uuid.Parse(raw)
	if err != nil || len(raw) != 36 {
		return "", refusal.Invalid(api.CodeInvalidInstanceID,
			fmt.Sprintf("Instance id %s is not a UUID of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx.", refusal.Quote(raw)))
	}
	return id.String(), nil
}

// Resolve applies the deployment's request semantics to a flavor and
// image: the vTPM they ask for (nil: none) or a *spec.Error.
func (s *Service) Resolve(req api.ResolveRequest) (*spec.Spec, error) {
	return spec.Resolve(specRequest(req), s.cfg.Options)
}

func specRequest(r api.ResolveRequest) spec.Request {
	return spec.Request{FlavorName: r.FlavorName, FlavorSpecs: r.FlavorSpecs, ImageName: r.ImageName, ImageProps: r.ImageProps}
}

// Create records a vTPM for an instance of the project req names: it
// resolves the request, checks a Hyper-V vTPM's keys, places the vTPM on
// a host that is up (neither down nor draining) with the traits it needs
// and free capacity, makes its secret and records it (desired running,
// phase pending) with its event, then wakes the host's agent. Creating
// vTPMs is the cloud's (the operator's): it knows whose instance is whose.
// Duplicates and full fleets are refused before a secret exists; a create
// racing another of the same instance loses at the record, and its secret
// goes.
//
// Placement holds across servers sharing the store: the transaction that
// records the vTPM checks that its host still has room (store.Tx.Room),
// and when creates elsewhere took it since it was chosen, the vTPM is
// placed again; when no host has room left, the create is refused with
// no_valid_host.
func (s *Service) Create(ctx context.Context, c tenant.Caller, req api.CreateVTPMRequest) (*store.VTPM, error) {
	id, err := ParseInstanceID(req.InstanceID)
	if err != nil {
		return nil, err
	}
	project, err := c.Owner(req.Project, "vTPMs", true)
	if err != nil {
		return nil, err
	}
	sp, err := s.Resolve(req.ResolveRequest)
	if err != nil {
		return nil, err
	}
	if sp == nil {
		return nil, refusal.Invalid(api.CodeNoVTPMRequested,
			"The flavor and image ask for no vTPM; set hw:tpm_version on the flavor or hw_tpm_version on the image.")
	}
	if sp.Hypervisor == spec.HyperV {
		if err := s.cfg.Secrets.CheckVTPMKeys(ctx, project, sp.Keys); err != nil {
			return nil, err
		}
	}
	kctx, err := s.asOwner(ctx, c, project, *sp)
	if err != nil {
		return nil, err
	}
	host, err := s.place(ctx, id, sp, "")
	if err != nil {
		return nil, err
	}
	v := &store.VTPM{InstanceID: id, Project: project, Spec: *sp, Host: host,
		Desired: store.DesiredRunning, Phase: store.PhasePending}
	err = s.record(kctx, v, "", store.Event{Actor: c.Actor, InstanceID: id, Action: "created",
		Detail: fmt.Sprintf("TPM %s %s on host %s", sp.Version, sp.Model, host)})
	if err != nil {
		return nil, fmt.Errorf("creating vTPM %s: %w", id, err)
	}
	return v, nil
}

// record makes a secret for the new vTPM v, placed on v.Host already, as
// the identity ctx carries (asOwner), and records both with ev (whose
// detail names the host: it is rewritten if v is placed again); an
// owner-held secret is staged for the host's agent in the same
// transaction. The transaction that records v checks that its host still
// has room (store.Tx.Room); when creates elsewhere took it since it was
// chosen, v is placed again, on pinned only when pinned is set.
func (s *Service) record(ctx context.Context, v *store.VTPM, pinned string, ev store.Event) error {
	payload, err := keyring.NewVTPMSecret()
	if err != nil {
		return err
	}
	chosen := v.Host
	_, err = keyring.CreateRecorded(ctx, s.cfg.Keyring, v.Project, keyring.VTPMSecretName(v.InstanceID), payload, func(secretID string) error {
		v.SecretID = secretID
		// One create at a time in this process, which only spares them
		// retries: on PostgreSQL concurrent creates abort each other's
		// serializable transactions (their predicate locks share index
		// pages), and each runs again. Across servers they do; Room keeps
		// capacities all the same.
		s.creating.Lock()
		defer s.creating.Unlock()
		for {
			err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
				if room, err := tx.Room(v.Host); err != nil || room <= 0 {
					return cmp.Or(err, errTaken)
				}
				if err := tx.CreateVTPM(v); err != nil {
					return err
				}
				if OwnerHeld(s.cfg.Keyring, v.Spec) {
					if err := s.stage(tx, v, payload); err != nil {
						return err
					}
				}
				e := ev
				e.Detail = strings.Replace(e.Detail, "host "+chosen, "host "+v.Host, 1)
				return tx.AppendEvent(e)
			})
			if !errors.Is(err, errTaken) {
				return err
			}
			if v.Host, err = s.place(ctx, v.InstanceID, &v.Spec, pinned); err != nil {
				return err
			}
		}
	})
	return err
}

// stage keeps v's secret payload for its host's agent (OwnerHeld), and
// deletes staged secrets that expired.
func (s *Service) stage(tx *store.Tx, v *store.VTPM, payload []byte) error {
	now := s.cfg.Now()
	if _, err := tx.DropExpiredStaged(now); err != nil {
		return err
	}
	return s.cfg.Staging.Stage(tx, keyring.Secret{ID: v.SecretID, Project: v.Project, Payload: payload, Created: now}, now.Add(s.cfg.StageFor))
}

// errTaken: the host chosen for a vTPM has no room left, taken by another
// create since (Create places the vTPM again).
var errTaken = errors.New("the host's last room was taken")

// place chooses the host for a new vTPM of instance id with sp, which
// must be pinned when that is set; the instance must have none.
func (s *Service) place(ctx context.Context, id string, sp *spec.Spec, pinned string) (host string, err error) {
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) error {
		if _, err := tx.GetVTPM(id); err == nil {
			return store.ErrExists
		} else if !errors.Is(err, store.ErrNotFound) {
			return err
		}
		hosts, err := s.candidates(tx)
		if err != nil {
			return err
		}
		if pinned != "" {
			i := slices.IndexFunc(hosts, func(h spec.Host) bool { return h.Name == pinned })
			if i < 0 {
				return refusal.NotFound(api.CodeNotFound, "No such host: "+refusal.Quote(pinned)+".")
			}
			hosts = hosts[i : i+1]
		}
		h, err := spec.Place(hosts, sp.RequiredTraits())
		host = h.Name
		return err
	})
	return host, err
}

// candidates are the registered hosts with their free capacity and state.
func (s *Service) candidates(tx *store.Tx) ([]spec.Host, error) {
	hosts, err := s.hosts(tx, "")
	if err != nil {
		return nil, err
	}
	out := make([]spec.Host, len(hosts))
	for i, h := range hosts {
		out[i] = spec.Host{Name: h.Name, Traits: spec.NewTraitSet(h.Traits...), Free: h.Capacity - h.Used, State: h.State}
	}
	return out, nil
}

// Get reads the vTPM of instance id as the caller may see it: another
// project's is not found.
func (s *Service) Get(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
	id, err := ParseInstanceID(id)
	if err != nil {
		return nil, err
	}
	var v *store.VTPM
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { v, err = tx.GetVTPM(id); return err })
	if err == nil && !c.Sees(v.Project) {
		err = fmt.Errorf("vtpm %s: %w", id, store.ErrNotFound)
	}
	return v, err
}

// recheck is how often Watch reads a record again though nothing woke it:
// another server's commits on a shared PostgreSQL database wake it through
// the store's notifications, so this is only the net for one lost while
// the store's listener reconnected.
const recheck = 10 * time.Second

// Watch reads the vTPM of instance id (as Get) until seen reports false of
// it, and returns it with changed set; when stop closes first, it returns
// the last read with changed false. A change committed by this process
// answers at once, one by another within recheck.
func (s *Service) Watch(ctx context.Context, c tenant.Caller, id string, seen func(*store.VTPM) bool, stop <-chan struct{}) (v *store.VTPM, changed bool, err error) {
	var news <-chan struct{}
	for {
		if v, err = s.Get(ctx, c, id); err != nil || !seen(v) {
			return v, err == nil, err
		}
		if news == nil {
			// Listen, then read again, so that a change between the two
			// reads is not missed. (Only for records that exist: a
			// listener is kept until its record next changes.)
			news = s.cfg.Store.VTPMChanged(v.InstanceID)
			continue
		}
		t := time.NewTimer(recheck)
		select {
		case <-news:
			news = nil
		case <-t.C:
		case <-stop:
			t.Stop()
			return v, false, nil
		}
		t.Stop()
	}
}

// List reads one page of the vTPMs f selects that the caller may see: a
// caller scoped to a project lists only its own. next, when set, is the
// instance id to continue after.
func (s *Service) List(ctx context.Context, c tenant.Caller, f store.Filter) (page []*store.VTPM, next string, err error) {
	if c.Project != "" {
		if f.Project != "" && f.Project != c.Project {
			return nil, "", refusal.Forbidden(api.CodeInvalidProject, "A caller scoped to one project cannot list another's vTPMs.")
		}
		f.Project = c.Project
	}
	// Fetch one more than the page to know whether a next page exists.
	f.Limit++
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { page, err = tx.ListVTPMs(f); return err })
	if err != nil {
		return nil, "", err
	}
	if len(page) == f.Limit {
		page = page[:len(page)-1]
		next = page[len(page)-1].InstanceID
	}
	return page, next, nil
}

// Delete deletes a vTPM and shreds its secret before it returns, whatever
// phase the vTPM is in: one transaction marks the record deleted (from
// then on nothing may start it or point it at another secret) and reads
// the secret it names, which is shredded right after the commit
// (keyring.ShredRecorded). The host's agent then removes the state and the
// record, and anything it was still making for the vTPM.
//
// A vTPM no agent has acted on has nothing on any host and goes at once,
// record and all (gone): a host without a vtpmd agent (Hyper-V) would
// never finish its delete. An agent's first act is recorded in the same
// store, so the check is part of the transaction. A shelved vTPM is on no
// host either: it goes at once, with its shelved bundle.
func (s *Service) Delete(ctx context.Context, c tenant.Caller, id string) (v *store.VTPM, gone bool, err error) {
	if v, err = s.Get(ctx, c, id); err != nil {
		return nil, false, err
	}
	// A secret its owner holds is shredded with the owner's token; without
	// one (the operator, an admin) the vTPM goes and its secret stays in
	// the owner's project, which alone can delete it (as with Nova).
	kctx, err := s.asOwner(ctx, c, v.Project, v.Spec)
	left := ""
	if err != nil {
		kctx, left = ctx, v.SecretID
	}
	id = v.InstanceID
	err = keyring.ShredRecorded(kctx, s.cfg.Keyring, func() ([]string, error) {
		err := s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
			if v, err = tx.GetVTPM(id); err != nil {
				return err
			}
			if !c.Sees(v.Project) {
				return fmt.Errorf("vtpm %s: %w", id, store.ErrNotFound)
			}
			if err := notMigrating(tx, id); err != nil {
				return err
			}
			detail0 := "never provisioned: nothing on the host"
			if gone, err = untouched(tx, v); err != nil {
				return err
			}
			if v.Phase == store.PhaseShelved {
				// On no host: the record and its shelved bundle go now.
				gone, detail0 = true, "shelved: nothing on any host"
			}
			detail := ""
			if left != "" {
				detail = "its secret " + left + " stays in project " + v.Project + "'s key manager: only that project can delete it"
			}
			if err := tx.DropStaged(v.SecretID); err != nil {
				return err
			}
			if gone {
				return deleteRecord(tx, v.InstanceID, store.Event{Actor: c.Actor, InstanceID: id, Action: "deleted",
					Detail: strings.TrimSuffix(detail0+"; "+detail, "; ")})
			}
			if v.Desired == store.DesiredDeleted {
				return nil // asked before; the secret is shredded again, harmlessly
			}
			v.Desired = store.DesiredDeleted
			if err := tx.UpdateVTPM(v); err != nil {
				return err
			}
			return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: id, Action: "delete requested", Detail: detail})
		})
		if err != nil || left != "" {
			return nil, err
		}
		if v.Resize != nil {
			// The old TPM a resize keeps goes with the vTPM.
			return []string{v.SecretID, v.Resize.OldSecretID}, nil
		}
		return []string{v.SecretID}, nil
	})
	if err != nil {
		return nil, false, err
	}
	return v, gone, nil
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
	return tx.AppendEvent(e)
}

// Start asks for the vTPM to run (on a libvirt host: its guest too); not
// while it migrates (migration_in_progress).
//
// A vTPM whose owner holds its secret (OwnerHeld) starts only at its
// owner's request: the secret is read with the caller's token and staged
// for the host's agent, which cannot read it otherwise.
func (s *Service) Start(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
	start := func(v *store.VTPM) error {
		// A migration that begins after this read changes the record,
		// and the start's write conflicts.
		if err := s.cfg.Store.View(ctx, func(tx *store.Tx) error { return notMigrating(tx, v.InstanceID) }); err != nil {
			return err
		}
		return desire(v, store.DesiredRunning)
	}
	if v, err := s.Get(ctx, c, id); err != nil || !OwnerHeld(s.cfg.Keyring, v.Spec) {
		return s.change(ctx, c, id, "start requested", start, nil)
	}
	var payload []byte
	defer func() { clear(payload) }()
	return s.change(ctx, c, id, "start requested", func(v *store.VTPM) error {
		if err := start(v); err != nil {
			return err
		}
		kctx, err := s.asOwner(ctx, c, v.Project, v.Spec)
		if err != nil {
			return err
		}
		sec, err := s.cfg.Keyring.Get(kctx, v.SecretID)
		if err != nil {
			return fmt.Errorf("reading the secret of vTPM %s: %w", v.InstanceID, err)
		}
		payload = sec.Payload
		return nil
	}, func(tx *store.Tx, v *store.VTPM) error { return s.stage(tx, v, payload) })
}

// Stop asks for the vTPM to stop, its state kept.
func (s *Service) Stop(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
	return s.change(ctx, c, id, "stop requested", func(v *store.VTPM) error { return desire(v, store.DesiredStopped) }, nil)
}

var errDeleting = refusal.Conflict(api.CodeConflict, "The vTPM is being deleted.")

// desire sets what the user wants. A deleted vTPM cannot be started again,
// nor a shelved one until it is unshelved.
func desire(v *store.VTPM, d store.Desired) error {
	if v.Desired == store.DesiredDeleted && d != store.DesiredDeleted {
		return errDeleting
	}
	if d == store.DesiredRunning && (v.Phase == store.PhaseShelving || v.Phase == store.PhaseShelved || v.Phase == store.PhaseUnshelving) {
		return refusal.Conflict(api.CodeVTPMShelved, "The vTPM of "+v.InstanceID+" is "+string(v.Phase)+
			": it has no host to run on until it is unshelved (vtpmctl unshelve).")
	}
	v.Desired = d
	return nil
}

// domainRE bounds libvirt domain names to what is safe in paths and XML.
var domainRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$`)

// Attach asks for the vTPM to be attached to a libvirt domain on its host,
// which must run the libvirt backend; a vTPM is attached to one domain at
// a time.
func (s *Service) Attach(ctx context.Context, c tenant.Caller, id, domain string) (*store.VTPM, error) {
	if !domainRE.MatchString(domain) {
		return nil, refusal.Invalid(api.CodeInvalidParameter, "Domain "+refusal.Quote(domain)+
			" is not a valid libvirt domain name (letters, digits, '_', '.', '+', '-'; at most 128).")
	}
	return s.change(ctx, c, id, "attach to domain "+domain, func(v *store.VTPM) error {
		if err := s.canAttach(ctx, v); err != nil {
			return err
		}
		if v.Domain != "" && v.Domain != domain {
			return refusal.Conflict(api.CodeConflict, "The vTPM is attached to domain "+v.Domain+"; detach it first.")
		}
		v.Domain = domain
		return nil
	}, nil)
}

// Detach asks for the vTPM to be detached from its libvirt domain.
func (s *Service) Detach(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
	return s.change(ctx, c, id, "detach", func(v *store.VTPM) error {
		v.Domain = ""
		return nil
	}, nil)
}

// canAttach refuses vTPMs on hosts whose backend has no guests to attach
// to, and deleted ones.
func (s *Service) canAttach(ctx context.Context, v *store.VTPM) error {
	if v.Desired == store.DesiredDeleted {
		return errDeleting
	}
	var h *store.Host
	err := s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) {
		h, err = tx.GetHost(v.Host)
		return err
	})
	if err != nil {
		return err
	}
	if h.Backend != "libvirt" {
		return refusal.Conflict(api.CodeNotSupported, "Host "+h.Name+" runs the "+h.Backend+
			" backend, which has no libvirt domains to attach to.")
	}
	return nil
}

// change applies mutate to the vTPM, records the event when it changed
// anything, and wakes the host's agent. Repeating a request is harmless,
// so a write that lost to another (the host's agent reporting what it
// observed, mostly) is applied again to the record as it is now, a few
// times before the conflict reaches the caller.
func (s *Service) change(ctx context.Context, c tenant.Caller, id, action string, mutate func(*store.VTPM) error, also func(*store.Tx, *store.VTPM) error) (*store.VTPM, error) {
	for attempt := 1; ; attempt++ {
		v, err := s.changeOnce(ctx, c, id, action, mutate, also)
		// ErrContended retried already, at the store.
		if !errors.Is(err, store.ErrConflict) || errors.Is(err, store.ErrContended) || attempt == changeAttempts {
			return v, err
		}
	}
}

// changeAttempts bounds change's attempts: an agent reports a vTPM a few
// times while it starts or stops, never continuously.
const changeAttempts = 5

func (s *Service) changeOnce(ctx context.Context, c tenant.Caller, id, action string, mutate func(*store.VTPM) error, also func(*store.Tx, *store.VTPM) error) (*store.VTPM, error) {
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return nil, err
	}
	before := *v
	if err := mutate(v); err != nil {
		return nil, err
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
	if v.Desired != before.Desired || v.Domain != before.Domain || v.Phase != before.Phase || v.Reason != before.Reason || also != nil {
		err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error {
			if err := tx.UpdateVTPM(v); err != nil {
				return err
			}
			if also != nil {
				if err := also(tx, v); err != nil {
					return err
				}
			}
			return tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: v.InstanceID, Action: action})
		})
		if err != nil {
			return nil, err
		}
	}
	return v, nil
}

// Identity reads a manufactured vTPM: one without endorsement keys yet is
// refused as not ready.
func (s *Service) Identity(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return nil, err
	}
	if len(v.EKs) == 0 {
		return nil, refusal.Conflict(api.CodeNotReady, "The vTPM has not been manufactured yet (phase "+string(v.Phase)+").")
	}
	return v, nil
}

// Events is the audit log of the vTPM of instance id, oldest first: its
// own, not that of an earlier vTPM of the same instance id.
func (s *Service) Events(ctx context.Context, c tenant.Caller, id string) ([]store.Event, error) {
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return nil, err
	}
	var evs []store.Event
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { evs, err = tx.ListEvents(v.InstanceID, v.Incarnation); return err })
	return evs, err
}

// AllEvents is the operator's audit trail of an instance id: the events
// of every vTPM it has had, deleted ones included, each naming its
// incarnation. A project sees only its own vTPM's (Events).
func (s *Service) AllEvents(ctx context.Context, c tenant.Caller, id string) ([]store.Event, error) {
	if c.Project != "" {
		return nil, refusal.Forbidden(api.CodeForbidden, "?all is the operator's: a project sees the events of its own vTPM only.")
	}
	id, err := ParseInstanceID(id)
	if err != nil {
		return nil, err
	}
	var evs []store.Event
	if err := s.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { evs, err = tx.ListAllEvents(id); return err }); err != nil {
		return nil, err
	}
	if len(evs) == 0 {
		return nil, fmt.Errorf("events of %s: %w", id, store.ErrNotFound)
	}
	return evs, nil
}

// Host is a registered host, how many vTPMs it holds, and whether it
// takes new ones.
type Host struct {
	store.Host
	Used  int
	State spec.HostState
	// Certificates counts the host's valid host certificates (see
	// internal/enrol).
	Certificates int
}

// Hosts reads every host, or the one named ("" for all); a name no host
// has reads as none.
func (s *Service) Hosts(ctx context.Context, name string) (hosts []Host, err error) {
	err = s.cfg.Store.View(ctx, func(tx *store.Tx) error {
		hosts, err = s.hosts(tx, name)
		return err
	})
	return hosts, err
}

// hosts reads hosts in tx as Hosts does, judging heartbeats by the clock
// now.
func (s *Service) hosts(tx *store.Tx, name string) ([]Host, error) {
	now := s.cfg.Now()
	loads, err := tx.ListHostLoads(now)
	if err != nil {
		return nil, err
	}
	var out []Host
	for _, h := range loads {
		if name == "" || h.Name == name {
			out = append(out, Host{Host: h.Host, Used: h.VTPMs, State: s.state(&h.Host, now), Certificates: h.Certificates})
		}
	}
	return out, nil
}

// state is whether h takes new vTPMs at now: down once its agent's last
// heartbeat is older than the window (whether drained or not: that it is
// gone is the news), else draining if the operator drained it, else up.
func (s *Service) state(h *store.Host, now time.Time) spec.HostState {
	switch {
	case now.Sub(h.HeartbeatAt) > s.cfg.HeartbeatWindow:
		return spec.HostDown
	case h.Draining:
		return spec.HostDraining
	}
	return spec.HostUp
}

// Heartbeat records that host's agent, running version, is alive now.
// The caller has authenticated the agent as that host; an unknown host is
// not found.
func (s *Service) Heartbeat(ctx context.Context, host, version string) error {
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) error { return tx.Heartbeat(host, version) })
	if errors.Is(err, store.ErrNotFound) {
		return refusal.NotFound(api.CodeNotFound, "No such host.")
	}
	return err
}

// Drain stops (drain) or lets again (undrain) new vTPMs be placed on a
// host: the operator's, before maintenance. The host's vTPMs stay where
// they are and keep running. Repeating either is harmless; a change is
// recorded as an event of the host naming the caller, and logged.
func (s *Service) Drain(ctx context.Context, c tenant.Caller, name string, drain bool) (Host, error) {
	if c.Project != "" {
		return Host{}, refusal.Forbidden(api.CodeForbidden, "Hosts are the operator's: a project cannot drain one.")
	}
	action := "undrained"
	if drain {
		action = "drained"
	}
	var h Host
	var changed bool
	err := s.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		changed, err = tx.SetDraining(name, drain)
		if errors.Is(err, store.ErrNotFound) {
			return refusal.NotFound(api.CodeNotFound, "No such host.")
		}
		if err != nil {
			return err
		}
		if changed {
			detail := "new vTPMs are placed on it again"
			if drain {
				detail = "no new vTPMs are placed on it; those it holds stay"
			}
			if err := tx.AppendEvent(store.Event{Actor: c.Actor, InstanceID: store.HostKey(name), Action: action, Detail: detail}); err != nil {
				return err
			}
		}
		hosts, err := s.hosts(tx, name)
		if err != nil {
			return err
		}
		h = hosts[0]
		return nil
	})
	if err != nil {
		return Host{}, err
	}
	if changed {
		s.cfg.Log.Info("host "+action, "host", name, "by", c.Actor, "state", h.State)
	}
	return h, nil
}

// Phases counts the vTPMs in each phase.
func (s *Service) Phases(ctx context.Context) (map[store.Phase]int, error) {
	counts := map[store.Phase]int{}
	err := s.cfg.Store.View(ctx, func(tx *store.Tx) error {
		vs, err := tx.ListVTPMs(store.Filter{})
		for _, v := range vs {
			counts[v.Phase]++
		}
		return err
	})
	return counts, err
}
