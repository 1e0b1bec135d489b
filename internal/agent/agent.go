// Package agent is the host agent: it registers its host with the traits its
// backend can serve and moves every vTPM placed on the host towards its
// desired state. It reaches the control plane only through Records, and
// asks its Backend to act through requests (VTPM) that carry what a
// backend needs, never the records themselves.
//
// The agent watches its host's records from a revision, so a change to one
// vTPM costs it one record read and one reconciliation however many vTPMs
// the host has; it keeps the records it was told in memory. Reconciliation
// is level-triggered and idempotent: a periodic pass reconciles every
// vTPM it holds against the backend again, and a pass interrupted by a
// crash is finished by the next one.
//
// The transfers of state the watch hands it (exports, imports, the steps
// of cold and live migrations) are carried out apart from the watch, each
// in its own goroutine: the agent takes each one for its run first
// (Records.TakeTransfer), so that the watch hands it no more and goes on
// with the host's other changes while a live migration takes minutes. A
// run is one start of the agent's process; a transfer taken by a run that
// died unanswered is handed to the next one and carried out again, as the
// rest of the agent's work is. At most Sends live migrations' sends run at
// once, and Workers other transfers; a vTPM is acted on by one
// reconciliation or transfer at a time.
package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/buildinfo"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// DefaultHeartbeatInterval is the time between an agent's heartbeats.
const DefaultHeartbeatInterval = 10 * time.Second

// Agent reconciles one host.
type Agent struct {
	Host     string
	Capacity int
	// Records are the control plane's records of the host and its vTPMs,
	// and the secrets that key their state.
	Records Records
	Backend Backend
	Log     *slog.Logger
	// Version is the vtpmd build the agent says it runs; default
	// buildinfo.Version().
	Version string
	// Interval between passes over every vTPM the agent holds; default
	// 5s. Changes are acted on as they are watched, not at passes.
	Interval time.Duration
	// WatchWait is how long one watch waits for a change; default 30s.
	WatchWait time.Duration
	// HeartbeatInterval is the time between heartbeats while Run runs;
	// default DefaultHeartbeatInterval. The server reads the host down
	// when they stop for longer than its window
	// (vtpms.Config.HeartbeatWindow).
	HeartbeatInterval time.Duration
	// Workers bounds how many vTPMs are reconciled at once, and how many
	// transfers other than live migrations' sends are carried out at once;
	// default 8 each.
	Workers int
	// Sends bounds how many live migrations' sends (each a libvirt
	// migration, sharing the host's link and CPU) the agent carries out
	// at once; default 8. The server's own bound (evacuate-live's
	// --max-concurrent) is the one an operator sets.
	Sends int

	once sync.Once
	// runName names this run of the agent (one start of its process): random,
	// registered with the host.
	runName string
	// sendSlots and transferSlots hold a token per send, and per other
	// transfer, under way.
	sendSlots, transferSlots chan struct{}
	mu                       sync.Mutex
	// carrying are the ids of the transfers this run carries out now.
	carrying map[string]bool
	// held are the host's records as last watched or written, by
	// instance id.
	held     map[string]*Record
	revision int64 // of held, as the control plane counts
	// secrets are the secrets the agent read, by instance id, kept while
	// the vTPM runs (secret security host: while it is on the host), as
	// swtpm keeps them in memory: a pass over a running vTPM does not
	// read the key manager again (Barbican may be far, or down), and the
	// secret of a vTPM whose owner holds it is given to the host once, at
	// its owner's request.
	secrets map[string]heldSecret
	// ownerHeld are the secret security modes whose secrets the control
	// plane keeps under their owners (Barbican: user, host), learnt from
	// a refused rekey: vTPMs of those modes take no pooled TPM, whose
	// secret only the owner could store.
	ownerHeld map[spec.SecretSecurity]bool
	locks     keyedMutex
	queue     queue
}

func (a *Agent) init() {
	a.once.Do(func() {
		if a.Log == nil {
			a.Log = slog.New(slog.DiscardHandler)
		}
		if a.Version == "" {
			a.Version = buildinfo.Version()
		}
		if a.Interval == 0 {
			a.Interval = 5 * time.Second
		}
		if a.WatchWait == 0 {
			a.WatchWait = 30 * time.Second
		}
		if a.HeartbeatInterval == 0 {
			a.HeartbeatInterval = DefaultHeartbeatInterval
		}
		if a.Workers == 0 {
			a.Workers = 8
		}
		if a.Sends == 0 {
			a.Sends = 8
		}
		run := make([]byte, 8)
		rand.Read(run) // never fails (crypto/rand)
		a.runName = hex.EncodeToString(run)
		a.sendSlots, a.transferSlots = make(chan struct{}, a.Sends), make(chan struct{}, a.Workers)
		a.carrying = map[string]bool{}
		a.held = map[string]*Record{}
		a.queue.init()
	})
}

// Register records the host with the traits its backend offers, its
// capacity, the agent's version and its run.
func (a *Agent) Register(ctx context.Context) error {
	a.init()
	caps, err := a.Backend.Capabilities(ctx)
	if err != nil {
		return fmt.Errorf("reading capabilities of host %s: %w", a.Host, err)
	}
	return a.Records.RegisterHost(ctx, Host{Name: a.Host, Traits: spec.HostTraits(caps).List(), Capacity: a.Capacity,
		Backend: a.Backend.Name(), Version: a.Version, Run: a.runName})
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

// Run registers the host, then records heartbeats, watches the host's
// records and reconciles what changes, and every Interval all it holds,
// and carries out the transfers the watch hands it, until ctx ends (and
// the transfers under way return). While the control plane cannot be
// reached, every vTPM keeps running as it is; registering and the watch
// retry with backoff, and the watch catches up from its revision when it
// answers again.
func (a *Agent) Run(ctx context.Context) error {
	a.init()
	a.retry(ctx, "registering the host", func() error { return a.Register(ctx) })
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { a.beat(ctx) })
	for range a.Workers {
		wg.Go(func() { a.work(ctx) })
	}
	wg.Go(func() {
		t := time.NewTicker(a.Interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				a.queue.add(a.ids()...)
			}
		}
	})
	for ctx.Err() == nil {
		a.retry(ctx, "watching the host's vTPMs", func() error {
			changed, transfers, err := a.watch(ctx, a.WatchWait)
			a.queue.add(changed...)
			return errors.Join(err, a.carry(ctx, &wg, transfers))
		})
	}
	return nil
}

// retry calls fn until it succeeds or ctx ends, waiting 100 ms after the
// first failure, doubling up to 30 s, and logging each.
func (a *Agent) retry(ctx context.Context, doing string, fn func() error) {
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, 30*time.Second) {
		err := fn()
		if err == nil || ctx.Err() != nil {
			return
		}
		a.Log.Warn(doing+" failed; retrying", "host", a.Host, "in", wait, "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// Reconcile reads what changed on the host and reconciles every vTPM it
// holds, once, then carries out the transfers handed to it, returning when
// all are done.
func (a *Agent) Reconcile(ctx context.Context) error {
	a.init()
	_, transfers, err := a.watch(ctx, 0)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	sem := make(chan struct{}, a.Workers)
	for _, id := range a.ids() {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			a.reconcileID(ctx, id)
		})
	}
	wg.Wait()
	return a.carry(ctx, &wg, transfers)
}

// watch reads what changed on the host since the agent's revision,
// waiting up to wait, takes it in and returns the ids of the vTPMs to
// reconcile and the transfers to carry out (carry); it answers the drift
// and adoption requests the watch carries.
func (a *Agent) watch(ctx context.Context, wait time.Duration) ([]string, []TransferAsk, error) {
	a.mu.Lock()
	since := a.revision
	a.mu.Unlock()
	ch, err := a.Records.Watch(ctx, a.Host, since, wait)
	if err != nil {
		return nil, nil, err
	}
	changed := a.apply(ch)
	var errs []error
	for _, ask := range ch.Adoptions {
		errs = append(errs, a.answerAdoption(ctx, ask))
	}
	if ch.Drift.ID != 0 {
		errs = append(errs, a.answerDrift(ctx, ch.Drift))
	}
	return changed, ch.Transfers, errors.Join(errs...)
}

// answerAdoption answers the operator's request to take over the vTPM of
// a domain with what the backend finds: a refusal, when the backend cannot
// adopt, or the domain or its vTPM is not to be taken, or the backend
// fails (its reason in the message).
func (a *Agent) answerAdoption(ctx context.Context, ask AdoptionAsk) error {
	var ans Adoption
	ad, ok := a.Backend.(Adopter)
	if !ok {
		ans.Refusal = refusal.Conflict(api.CodeNotSupported, "Host "+a.Host+" runs the "+a.Backend.Name()+
			" backend, which takes over no vTPMs; only libvirt's (emulator mode) does.")
	} else {
		var err error
		ans, err = ad.Adopt(ctx, ask, func(id string) ([]byte, error) { return a.Records.AdoptionSecret(ctx, a.Host, ask, id) })
		var r *refusal.Error
		switch {
		case errors.As(err, &r):
			ans = Adoption{Refusal: r} // the key manager's, through AdoptionSecret
		case err != nil:
			a.Log.Warn("looking at a vTPM to adopt", "host", a.Host, "instance", ask.InstanceID, "domain", ask.Domain, "err", err)
			ans = Adoption{Refusal: &refusal.Error{Kind: refusal.KindUnavailable, Code: api.CodeAdoptionFailed,
				Message: "Host " + a.Host + " could not look at domain " + ask.Domain + ": " + refusal.Truncate(err.Error())}}
		}
	}
	if err := a.Records.AnswerAdoption(ctx, a.Host, ask, ans); err != nil && !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("answering the adoption of %s: %w", ask.InstanceID, err)
	}
	return nil
}

// answerDrift answers the operator's drift request with what the backend
// finds against the records held.
func (a *Agent) answerDrift(ctx context.Context, ask DriftAsk) error {
	d, ok := a.Backend.(Drifter)
	if !ok {
		return a.Records.ReportDrift(ctx, a.Host, ask.ID, []api.Finding{})
	}
	findings, err := d.Drift(ctx, a.Held, ask.Repair)
	if err != nil {
		return fmt.Errorf("checking drift: %w", err)
	}
	if findings == nil {
		findings = []api.Finding{}
	}
	return a.Records.ReportDrift(ctx, a.Host, ask.ID, findings)
}

// apply takes in ch and returns the ids to reconcile: the records that
// are new or newer than the ones held. A record that left the host is
// dropped, nothing more: a vTPM's state goes only when its record asks
// (desired deleted), and what a record never asked to remove (after a
// restored database, say) is drift, for the operator to repair.
func (a *Agent) apply(ch *Changes) []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var ids []string
	if ch.Reset {
		now := make(map[string]bool, len(ch.Records))
		for _, r := range ch.Records {
			now[r.InstanceID] = true
		}
		for id := range a.held {
			if !now[id] {
				delete(a.held, id)
			}
		}
	}
	for _, g := range ch.Gone {
		if r := a.held[g.InstanceID]; r != nil && r.Incarnation == g.Incarnation {
			delete(a.held, g.InstanceID)
		}
	}
	for id := range a.secrets {
		if a.held[id] == nil {
			a.forget(id)
		}
	}
	for _, r := range ch.Records {
		if cur := a.held[r.InstanceID]; cur == nil || cur.Incarnation != r.Incarnation || r.Generation > cur.Generation {
			a.held[r.InstanceID] = r
			ids = append(ids, r.InstanceID)
		}
	}
	a.revision = ch.Revision
	return ids
}

// ids are the instance ids of the records held.
func (a *Agent) ids() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	ids := make([]string, 0, len(a.held))
	for id := range a.held {
		ids = append(ids, id)
	}
	return ids
}

// Held returns the vTPMs whose records the agent holds, as its backend
// sees them: what a backend's Drift compares the host with.
func (a *Agent) Held(context.Context) ([]VTPM, error) {
	a.init()
	a.mu.Lock()
	defer a.mu.Unlock()
	vs := make([]VTPM, 0, len(a.held))
	for _, r := range a.held {
		vs = append(vs, r.VTPM())
	}
	return vs, nil
}

// work reconciles queued vTPMs until ctx ends.
func (a *Agent) work(ctx context.Context) {
	for {
		id, ok := a.queue.take(ctx)
		if !ok {
			return
		}
		a.reconcileID(ctx, id)
	}
}

// reconcileID reconciles the vTPM held for id, one at a time per id. One
// that a transfer or another worker holds is not waited for: whoever holds
// it queues it again when done.
func (a *Agent) reconcileID(ctx context.Context, id string) {
	unlock, ok := a.locks.tryLock(id)
	if !ok {
		return
	}
	defer a.unlockQueue(id, unlock)
	a.mu.Lock()
	v := a.held[id]
	a.mu.Unlock()
	if v == nil {
		return
	}
	r := *v // the step writes to its own copy
	if err := a.reconcile(ctx, &r); err != nil && ctx.Err() == nil {
		a.Log.Warn("reconcile", "instance", id, "err", err)
	}
	a.hold(&r)
}

// hold keeps r, as the agent last wrote or read it, unless what is held is
// newer or another vTPM.
func (a *Agent) hold(r *Record) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if cur := a.held[r.InstanceID]; cur != nil && cur.Incarnation == r.Incarnation && r.Generation > cur.Generation {
		a.held[r.InstanceID] = r
	}
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
	case errors.Is(gerr, ErrNotFound) || gerr == nil && now.Incarnation != v.Incarnation:
		// Deleted before any agent acted on it, which leaves nothing to
		// remove; whatever a step made in the meantime goes.
		return a.Backend.Destroy(ctx, v.VTPM())
	case gerr != nil:
		return errors.Join(err, gerr)
	}
	*v = *now
	return a.step(ctx, v)
}

func (a *Agent) step(ctx context.Context, v *Record) error {
	if (v.Phase == PhaseShelving || v.Phase == PhaseUnshelving) && v.Desired != DesiredDeleted {
		return nil // the control plane moves its state; it sets the phase after
	}
	if v.Resize != "" && v.Desired != DesiredDeleted {
		if err := a.resize(ctx, v); err != nil {
			return err
		}
	}
	switch v.Desired {
	case DesiredDeleted:
		return a.destroy(ctx, v)
	case DesiredStopped:
		if v.Spec.SecretSecurity != spec.HostMode {
			a.mu.Lock()
			a.forget(v.InstanceID) // read again at the next start (a user vTPM's: at its owner's)
			a.mu.Unlock()
		}
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
	secret, err := a.secret(ctx, v)
	if err != nil && v.Phase == PhaseActive && a.pid(v.InstanceID) != 0 {
		// It runs (its swtpm outlived an agent restart): left running,
		// though the secret to start it again cannot be had now (the key
		// manager is down; only its owner can give it).
		return fmt.Errorf("reading the secret of running vTPM %s: %w", v.InstanceID, err)
	}
	if err != nil {
		return a.fail(ctx, v, "reading the vTPM secret", err)
	}
	eks, err := a.Backend.Ensure(ctx, v.VTPM(), secret)
	if err != nil {
		return a.fail(ctx, v, "running the vTPM", err)
	}
	sockets, pid, connected := a.Backend.Sockets(v.InstanceID), a.pid(v.InstanceID), a.connected(v.InstanceID)
	if v.Phase == PhaseActive && (len(v.EKs) > 0 || len(eks) == 0) && v.Sockets == sockets && v.PID == pid && v.Connected == connected {
		return nil // as recorded (a Xen stub domain makes its EK itself: none to record)
	}
	action := "started"
	switch {
	case len(v.EKs) == 0:
		v.EKs, action = eks, "manufactured and started"
	case v.Phase == PhaseActive && v.Sockets != sockets:
		action = "sockets changed" // the host's --socket-dir moved, say
	case v.Phase == PhaseActive && v.PID != pid:
		action = fmt.Sprintf("swtpm restarted (pid %d, was %d)", pid, v.PID)
	case v.Phase == PhaseActive && connected:
		action = "guest connected"
	case v.Phase == PhaseActive:
		action = "guest disconnected"
	}
	if action != "guest connected" && action != "guest disconnected" {
		// A guest's connection is an event of its own: recorded along
		// with another change it would go unseen in the vTPM's history.
		// The next pass, a second later, records it.
		connected = v.Phase == PhaseActive && v.Connected
	}
	v.Sockets, v.PID, v.Connected = sockets, pid, connected
	return a.setPhase(ctx, v, PhaseActive, "", action)
}

// heldSecret is a secret the agent keeps (Agent.owned).
type heldSecret struct {
	incarnation, id string
	payload         []byte
}

// secret is the payload that keys v's state: the one the agent keeps,
// else read from Records and kept.
func (a *Agent) secret(ctx context.Context, v *Record) ([]byte, error) {
	a.mu.Lock()
	h, ok := a.secrets[v.InstanceID]
	a.mu.Unlock()
	if ok && h.incarnation == v.Incarnation && h.id == v.SecretID {
		return h.payload, nil
	}
	secret, err := a.Records.Secret(ctx, v)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.secrets == nil {
		a.secrets = map[string]heldSecret{}
	}
	a.secrets[v.InstanceID] = heldSecret{incarnation: v.Incarnation, id: v.SecretID, payload: secret}
	return secret, nil
}

// forget drops the secret kept for id; a.mu held.
func (a *Agent) forget(id string) {
	delete(a.secrets, id) // not cleared: a step may be using it
}

// resize carries out the step a resize to a new TPM asks of the host
// (ResizeStep) before the vTPM is run or stopped as asked: the old TPM is
// set aside first, so that the step after it makes the new one; confirm
// and revert end with Records.Resized once the state is as they want it.
func (a *Agent) resize(ctx context.Context, v *Record) error {
	rz, ok := a.Backend.(Resizer)
	if !ok {
		return a.fail(ctx, v, "resizing", fmt.Errorf("the %s backend cannot keep a vTPM's old TPM beside a new one", a.Backend.Name()))
	}
	switch v.Resize {
	case ResizeSetAside:
		if err := rz.SetAside(ctx, v.VTPM()); err != nil {
			return a.fail(ctx, v, "setting the old TPM aside", err)
		}
		if v.Phase == PhasePending {
			return a.setPhase(ctx, v, PhaseProvisioning, "", "old TPM set aside")
		}
	case ResizeDiscard:
		if err := rz.Discard(ctx, v.VTPM()); err != nil {
			return a.fail(ctx, v, "removing the old TPM", err)
		}
		return a.Records.Resized(ctx, v, Event{Actor: a.actor(), Action: "old TPM removed", Detail: "resize confirmed"})
	case ResizeRestore:
		if err := rz.Restore(ctx, v.VTPM(), func() ([]byte, error) { return a.secret(ctx, v) }); err != nil {
			return a.fail(ctx, v, "putting the old TPM back", err)
		}
		return a.Records.Resized(ctx, v, Event{Actor: a.actor(), Action: "old TPM restored", Detail: "resize reverted"})
	}
	return nil
}

// fromPool gives a vTPM not yet manufactured a pooled TPM: the record is
// rekeyed with the pooled TPM's secret first, then the TPM is adopted, so
// that the record always names the secret of the state it has. A crash
// between the two leaves a record keyed with a secret and no state: the
// next pass takes another pooled TPM (shredding that secret) or
// manufactures one with it.
func (a *Agent) fromPool(ctx context.Context, pool Pool, v *Record) error {
	a.mu.Lock()
	skip := a.ownerHeld[v.Spec.SecretSecurity]
	a.mu.Unlock()
	if skip || pool.Adopted(v.InstanceID) {
		return nil
	}
	secret, adopt, discard, ok := pool.Claim(v.Spec.Version)
	if !ok {
		return nil // manufacture on demand
	}
	if err := a.Records.Rekey(ctx, v, secret, Event{Actor: a.actor(), Action: "adopted a pre-manufactured TPM"}); err != nil {
		discard()
		if errors.Is(err, ErrNeedsOwner) {
			// Its owner holds its secret: manufactured with that one, as
			// are the next vTPMs of its mode.
			a.mu.Lock()
			if a.ownerHeld == nil {
				a.ownerHeld = map[spec.SecretSecurity]bool{}
			}
			a.ownerHeld[v.Spec.SecretSecurity] = true
			a.mu.Unlock()
			return nil
		}
		return err
	}
	if err := adopt(ctx, v.InstanceID); err != nil {
		discard()
		return err
	}
	return nil
}

// destroy removes the state, then the record (with the secret, which the
// API shredded already when the delete was asked for), so that a crash at
// any step leaves a record that the next pass finishes deleting.
func (a *Agent) destroy(ctx context.Context, v *Record) error {
	if v.Phase != PhaseDeleting {
		if err := a.setPhase(ctx, v, PhaseDeleting, "", "deleting"); err != nil {
			return err
		}
	}
	a.mu.Lock()
	a.forget(v.InstanceID)
	a.mu.Unlock()
	if err := a.Backend.Destroy(ctx, v.VTPM()); err != nil {
		return a.fail(ctx, v, "removing the vTPM state", err)
	}
	return a.Records.Delete(ctx, v, Event{Actor: a.actor(), Action: "deleted", Detail: "state and secret destroyed"})
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

// setPhase records v in phase p; a vTPM that stopped, failed or is being
// deleted is served on no sockets, by no process, to no guest (an active
// one's, run sets).
func (a *Agent) setPhase(ctx context.Context, v *Record, p Phase, reason, action string) error {
	v.Phase, v.Reason = p, reason
	switch p {
	case PhaseStopped, PhaseError, PhaseDeleting:
		v.Sockets, v.PID, v.Connected = api.Sockets{}, 0, false
	}
	detail := string(p)
	if reason != "" {
		detail = reason
	}
	return a.Records.Update(ctx, v, Event{Actor: a.actor(), Action: action, Detail: detail})
}

func (a *Agent) actor() string { return "agent:" + a.Host }

// pid is the swtpm serving instanceID's vTPM, if the backend runs one.
func (a *Agent) pid(instanceID string) int {
	if s, ok := a.Backend.(Server); ok {
		return s.PID(instanceID)
	}
	return 0
}

// connected says a client holds instanceID's vTPM's control channel, if
// the backend can tell.
func (a *Agent) connected(instanceID string) bool {
	s, ok := a.Backend.(Server)
	return ok && s.Connected(instanceID)
}
