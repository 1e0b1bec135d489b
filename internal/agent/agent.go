// Package agent is the host agent: it registers its host with the traits its
// backend can serve and moves every vTPM placed on the host towards its
// desired state. It reaches the control plane's records only through
// Records, and asks its Backend to act through requests (VTPM) that carry
// what a backend needs, never the records themselves. Reconciliation is
// level-triggered and idempotent: each pass reads the records and the
// backend afresh, so a pass interrupted by a crash is finished by the next
// one.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/buildinfo"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// DefaultHeartbeatInterval is the time between an agent's heartbeats.
const DefaultHeartbeatInterval = 10 * time.Second

// Agent reconciles one host.
type Agent struct {
	Host     string
	Capacity int
	// Records are the control plane's records of the host and its vTPMs.
	Records Records
	// Keyring holds the secrets that key the vTPMs' state.
	Keyring keyring.Keyring
	Backend Backend
	Log     *slog.Logger
	// Version is the vtpmd build the agent says it runs; default
	// buildinfo.Version().
	Version string
	// Interval between full passes when nothing kicks the agent; default 5s.
	Interval time.Duration
	// HeartbeatInterval is the time between heartbeats while Run runs;
	// default DefaultHeartbeatInterval. The server reads the host down
	// when they stop for longer than its window
	// (vtpms.Config.HeartbeatWindow).
	HeartbeatInterval time.Duration
	// Workers bounds how many vTPMs are reconciled at once; default 8.
	Workers int

	kick chan struct{}
	once sync.Once
}

func (a *Agent) init() {
	a.once.Do(func() {
		a.kick = make(chan struct{}, 1)
		if a.Log == nil {
			a.Log = slog.New(slog.DiscardHandler)
		}
		if a.Version == "" {
			a.Version = buildinfo.Version()
		}
		if a.Interval == 0 {
			a.Interval = 5 * time.Second
		}
		if a.HeartbeatInterval == 0 {
			a.HeartbeatInterval = DefaultHeartbeatInterval
		}
		if a.Workers == 0 {
			a.Workers = 8
		}
	})
}

// Register records the host with the traits its backend offers, its
// capacity and the agent's version.
func (a *Agent) Register(ctx context.Context) error {
	a.init()
	caps, err := a.Backend.Capabilities(ctx)
	if err != nil {
		return fmt.Errorf("reading capabilities of host %s: %w", a.Host, err)
	}
	return a.Records.RegisterHost(ctx, Host{Name: a.Host, Traits: spec.HostTraits(caps).List(), Capacity: a.Capacity,
		Backend: a.Backend.Name(), Version: a.Version})
}

// Heartbeat records that the agent is alive.
func (a *Agent) Heartbeat(ctx context.Context) error {
	a.init()
	return a.Records.Heartbeat(ctx, Heartbeat{Host: a.Host, Version: a.Version})
}

// beat records a heartbeat at once and then every HeartbeatInterval until
// ctx ends, apart from reconciling, so that a long pass delays none. A
// heartbeat that fails is logged; the next one tries again.
func (a *Agent) beat(ctx context.Context) {
	t := time.NewTicker(a.HeartbeatInterval)
	defer t.Stop()
	for {
		if err := a.Heartbeat(ctx); err != nil && ctx.Err() == nil {
			a.Log.Warn("recording a heartbeat failed", "host", a.Host, "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Kick asks for a reconciliation pass soon; it never blocks.
func (a *Agent) Kick() {
	a.init()
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// Run records heartbeats and reconciles until ctx ends; the host must be
// registered.
func (a *Agent) Run(ctx context.Context) error {
	a.init()
	var beats sync.WaitGroup
	beats.Go(func() { a.beat(ctx) })
	defer beats.Wait()
	t := time.NewTicker(a.Interval)
	defer t.Stop()
	for {
		if err := a.Reconcile(ctx); err != nil && ctx.Err() == nil {
			a.Log.Error("reconcile pass failed", "host", a.Host, "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-a.kick:
		case <-t.C:
		}
	}
}

// Reconcile makes one pass over the host's vTPMs.
func (a *Agent) Reconcile(ctx context.Context) error {
	a.init()
	vs, err := a.Records.List(ctx, a.Host)
	if err != nil {
		return err
	}
	sem := make(chan struct{}, a.Workers)
	var wg sync.WaitGroup
	for _, v := range vs {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := a.reconcile(ctx, v); err != nil && ctx.Err() == nil {
				a.Log.Warn("reconcile", "instance", v.InstanceID, "err", err)
			}
		}()
	}
	wg.Wait()
	return nil
}

// reconcile moves v one step towards its desired state. If the record
// changed under the step (a delete while the TPM was being made, say), the
// step's writes were refused; it then acts on the record as it is now, so
// that a deleted vTPM's half-made state goes at once rather than a pass
// later.
func (a *Agent) reconcile(ctx context.Context, v *Record) error {
	err := a.step(ctx, v)
	if !errors.Is(err, ErrConflict) && !errors.Is(err, ErrNotFound) {
		return err
	}
	now, gerr := a.Records.Get(ctx, v.InstanceID)
	switch {
	case errors.Is(gerr, ErrNotFound):
		// Deleted before any agent acted on it, which leaves nothing to
		// remove; whatever a step made in the meantime goes.
		return errors.Join(a.Backend.Destroy(ctx, v.VTPM()), keyring.Shred(ctx, a.Keyring, a.secrets(v)...))
	case gerr != nil:
		return errors.Join(err, gerr)
	}
	return a.step(ctx, now)
}

func (a *Agent) step(ctx context.Context, v *Record) error {
	switch v.Desired {
	case DesiredDeleted:
		return a.destroy(ctx, v)
	case DesiredStopped:
		if v.Phase == PhaseStopped {
			return nil
		}
		if err := a.Backend.Stop(ctx, v.VTPM()); err != nil {
			return a.fail(ctx, v, "stopping", err)
		}
		return a.setPhase(ctx, v, PhaseStopped, "", "stopped")
	default:
		return a.run(ctx, v)
	}
}

func (a *Agent) run(ctx context.Context, v *Record) error {
	if v.Phase == PhasePending {
		if err := a.setPhase(ctx, v, PhaseProvisioning, "", "provisioning"); err != nil {
			return err
		}
	}
	if pool, ok := a.Backend.(Pool); ok && len(v.EKs) == 0 {
		if err := a.fromPool(ctx, pool, v); err != nil {
			return a.fail(ctx, v, "taking a pre-manufactured TPM", err)
		}
	}
	sec, err := a.Keyring.Get(ctx, v.SecretID)
	if err != nil {
		return a.fail(ctx, v, "reading the vTPM secret", err)
	}
	eks, err := a.Backend.Ensure(ctx, v.VTPM(), sec.Payload)
	if err != nil {
		return a.fail(ctx, v, "running the vTPM", err)
	}
	sockets := a.Backend.Sockets(v.InstanceID)
	if v.Phase == PhaseActive && (len(v.EKs) > 0 || len(eks) == 0) && v.Sockets == sockets {
		return nil // as recorded (a Xen stub domain makes its EK itself: none to record)
	}
	action := "started"
	switch {
	case len(v.EKs) == 0:
		v.EKs, action = eks, "manufactured and started"
	case v.Phase == PhaseActive:
		action = "sockets changed" // the host's --socket-dir moved, say
	}
	return a.setPhase(ctx, v, PhaseActive, "", action)
}

// fromPool gives a vTPM not yet manufactured a pooled TPM: its secret is
// stored for the vTPM's project, the TPM adopted, and the record pointed at
// the secret. It also finishes an adoption a crash interrupted. An adoption
// the record does not take (it changed meanwhile: deleted, say) is undone,
// state and secret, so that nothing of it outlives the vTPM.
func (a *Agent) fromPool(ctx context.Context, pool Pool, v *Record) error {
	if id := pool.AdoptedSecret(v.InstanceID); id != "" {
		if id == v.SecretID {
			return nil
		}
		if err := a.switchSecret(ctx, v, id); err != nil {
			return errors.Join(err, a.unadopt(ctx, v, id))
		}
		return nil
	}
	secret, adopt, discard, ok := pool.Claim(v.Spec.Version)
	if !ok {
		return nil // manufacture on demand
	}
	stored := false
	_, err := keyring.CreateRecorded(ctx, a.Keyring, v.Project, secret, func(id string) error {
		stored = true
		if err := adopt(ctx, v.InstanceID, id); err != nil {
			discard()
			return err
		}
		if err := a.switchSecret(ctx, v, id); err != nil {
			return errors.Join(err, a.Backend.Destroy(context.WithoutCancel(ctx), v.VTPM()))
		}
		return nil
	})
	if err != nil && !stored {
		discard()
	}
	return err
}

// unadopt throws away a TPM adopted for v under secret id, which v's record
// does not name.
func (a *Agent) unadopt(ctx context.Context, v *Record, id string) error {
	return errors.Join(a.Backend.Destroy(context.WithoutCancel(ctx), v.VTPM()), keyring.Shred(ctx, a.Keyring, id))
}

// switchSecret points v at secret id and shreds the one it had, which no
// state was ever encrypted with. It fails only if the record did not take
// the new secret (v is then as it was); an old secret that cannot be
// shredded now is reclaimed at the next start.
func (a *Agent) switchSecret(ctx context.Context, v *Record, id string) error {
	old := *v
	v.SecretID = id
	committed := false
	err := keyring.ShredRecorded(ctx, a.Keyring, func() ([]string, error) {
		err := a.Records.Update(ctx, v, Event{Actor: a.actor(), Action: "adopted a pre-manufactured TPM", Detail: "its key is secret " + id})
		committed = err == nil
		return []string{old.SecretID}, err
	})
	if !committed {
		*v = old
		return err
	}
	if err != nil {
		a.Log.Warn("shredding the unused vTPM secret", "instance", v.InstanceID, "secret", old.SecretID, "err", err)
	}
	return nil
}

// destroy shreds the secrets, then removes the state, then the record, so
// that a crash at any step leaves a record that the next pass finishes
// deleting. The API shredded the record's secret already, when the delete
// was asked for; this one is for a pass that finds it (or a secret an
// adoption left) still there.
func (a *Agent) destroy(ctx context.Context, v *Record) error {
	if v.Phase != PhaseDeleting {
		if err := a.setPhase(ctx, v, PhaseDeleting, "", "deleting"); err != nil {
			return err
		}
	}
	if err := keyring.Shred(ctx, a.Keyring, a.secrets(v)...); err != nil {
		return a.fail(ctx, v, "deleting the vTPM secret", err)
	}
	if err := a.Backend.Destroy(ctx, v.VTPM()); err != nil {
		return a.fail(ctx, v, "removing the vTPM state", err)
	}
	return a.Records.Delete(ctx, v.InstanceID, Event{Actor: a.actor(), Action: "deleted", Detail: "state and secret destroyed"})
}

// secrets are the key-manager secrets v's state may be encrypted with: the
// record's, and that of a TPM adopted from the pool whose record a crash
// kept from naming it.
func (a *Agent) secrets(v *Record) []string {
	ids := []string{v.SecretID}
	if pool, ok := a.Backend.(Pool); ok {
		if id := pool.AdoptedSecret(v.InstanceID); id != "" && id != v.SecretID {
			ids = append(ids, id)
		}
	}
	return ids
}

// fail records an error phase with a reason a person can act on.
func (a *Agent) fail(ctx context.Context, v *Record, doing string, err error) error {
	reason := doing + ": " + err.Error()
	if v.Desired == DesiredDeleted && v.Phase == PhaseDeleting || v.Phase == PhaseError && v.Reason == reason {
		return err // already recorded; keep retrying without flooding the log
	}
	phase := PhaseError
	if v.Desired == DesiredDeleted {
		phase = PhaseDeleting
	}
	if uerr := a.setPhase(ctx, v, phase, reason, "error"); uerr != nil {
		return errors.Join(err, uerr)
	}
	return err
}

// setPhase records v in phase p, with the sockets the vTPM is served on
// when it is active and none when it stopped, failed or is being deleted.
func (a *Agent) setPhase(ctx context.Context, v *Record, p Phase, reason, action string) error {
	v.Phase, v.Reason = p, reason
	switch p {
	case PhaseActive:
		v.Sockets = a.Backend.Sockets(v.InstanceID)
	case PhaseStopped, PhaseError, PhaseDeleting:
		v.Sockets = api.Sockets{}
	}
	detail := string(p)
	if reason != "" {
		detail = reason
	}
	return a.Records.Update(ctx, v, Event{Actor: a.actor(), Action: action, Detail: detail})
}

func (a *Agent) actor() string { return "agent:" + a.Host }
