package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/bundle"
	"github.com/vtpmd/vtpmd/internal/refusal"
)

// answerTransfer answers the control plane's request to export a vTPM's
// state as a sealed bundle, to import one over the state it holds, to
// receive the bundle of a vTPM arriving (migrating here, or unshelved
// here), to discard the state of one leaving (migrated away, or being
// shelved) or to carry out a step of a live migration, with what the
// backend did, or a refusal: the vTPM is not held
// here (not_found), the backend moves no state (not_supported), a bundle
// to import is not the vTPM's (bundle_corrupt, bundle_mismatch), the vTPM
// is not stopped for an import (vtpm_not_stopped), a live migration's
// target cannot undo it (guest_runs_here, guest_arriving), or the backend failed
// (transfer_failed, its reason in the message). The vTPM is not
// reconciled meanwhile (it is reconciled after, if a pass came by).
func (a *Agent) answerTransfer(ctx context.Context, ask TransferAsk) error {
	unlock := a.locks.lock(ask.InstanceID)
	defer a.unlockQueue(ask.InstanceID, unlock)
	ans, err := a.transfer(ctx, ask)
	var r *refusal.Error
	switch {
	case errors.As(err, &r):
		ans = Transfer{Refusal: r}
	case err != nil:
		a.Log.Warn("transferring a vTPM's state", "host", a.Host, "instance", ask.InstanceID, "kind", ask.Kind, "err", err)
		ans = Transfer{Refusal: &refusal.Error{Kind: refusal.KindUnavailable, Code: api.CodeTransferFailed,
			Message: fmt.Sprintf("Host %s could not %s the state of %s: %s", a.Host, ask.Kind, ask.InstanceID, refusal.Truncate(err.Error()))}}
	}
	if err := a.Records.AnswerTransfer(ctx, a.Host, ask, ans); err != nil && !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("answering the %s of %s: %w", ask.Kind, ask.InstanceID, err)
	}
	return nil
}

func (a *Agent) transfer(ctx context.Context, ask TransferAsk) (Transfer, error) {
	switch ask.Kind {
	case TransferReceive, TransferDiscard:
		return Transfer{}, a.move(ctx, ask)
	case TransferPrepare, TransferSend, TransferSettle, TransferAbort:
		return a.live(ctx, ask)
	case TransferCancel:
		// Read by the send it cancels (sendLive); answered once that
		// send is over, with nothing left to do.
		return Transfer{}, nil
	}
	a.mu.Lock()
	held := a.held[ask.InstanceID]
	a.mu.Unlock()
	if held == nil || held.Incarnation != ask.Incarnation {
		return Transfer{}, refusal.NotFound(api.CodeNotFound, "Host "+a.Host+" holds no such vTPM.")
	}
	v := *held
	ex, ok := a.Backend.(Exporter)
	if !ok {
		return Transfer{}, refusal.Conflict(api.CodeNotSupported, "Host "+a.Host+" runs the "+a.Backend.Name()+
			" backend, which moves no vTPM state.")
	}
	if ask.Kind == TransferImport && (v.Desired != DesiredStopped || v.Phase != PhaseStopped) {
		return Transfer{}, refusal.Conflict(api.CodeVTPMNotStopped, "The vTPM of "+v.InstanceID+" is "+string(v.Phase)+
			" on host "+a.Host+"; its state is replaced only while it is stopped.")
	}
	in, err := a.Records.TransferInput(ctx, a.Host, ask)
	if err != nil {
		return Transfer{}, fmt.Errorf("reading the vTPM secret: %w", err)
	}
	switch ask.Kind {
	case TransferExport:
		return a.export(ctx, ex, &v, ask.Generation, in.Secret)
	case TransferImport:
		return Transfer{}, a.importBundle(ctx, ex, &v, ask, in)
	}
	return Transfer{}, refusal.Invalid(api.CodeInvalidParameter, "A transfer exports or imports, not "+refusal.Quote(string(ask.Kind))+".")
}

// move takes in the state of a vTPM arriving on this host (a receive:
// imported and proven as for TransferImport, the vTPM's record coming with
// the request: a migrating one is still placed on its source, an
// unshelved one has no state here yet), or removes the state of one
// leaving it (a discard: migrated away, or being shelved with its bundle
// kept by the server). The server released the request's input only
// because the vTPM is at that step of its move: it is not reconciled here
// meanwhile.
func (a *Agent) move(ctx context.Context, ask TransferAsk) error {
	in, err := a.Records.TransferInput(ctx, a.Host, ask)
	if err != nil {
		return fmt.Errorf("reading the moving vTPM's record: %w", err)
	}
	v := in.Record
	if v == nil || v.Incarnation != ask.Incarnation {
		return refusal.NotFound(api.CodeNotFound, "No such vTPM is moving to or from host "+a.Host+".")
	}
	a.mu.Lock()
	if held := a.held[v.InstanceID]; held != nil && held.Incarnation == v.Incarnation {
		delete(a.held, v.InstanceID)
	}
	a.forget(v.InstanceID)
	a.mu.Unlock()
	if ask.Kind == TransferDiscard {
		return a.Backend.Destroy(ctx, v.VTPM())
	}
	ex, ok := a.Backend.(Exporter)
	if !ok {
		return refusal.Conflict(api.CodeNotSupported, "Host "+a.Host+" runs the "+a.Backend.Name()+
			" backend, which moves no vTPM state.")
	}
	return a.importBundle(ctx, ex, v, ask, in)
}

// live carries out this host's part of a live migration (LiveMigrator):
// prepare, settle or abort on the target, send on the source. The server
// released the request's input only because the vTPM is at that step of
// its move. A source that sent the guest away stops reconciling its vTPM.
func (a *Agent) live(ctx context.Context, ask TransferAsk) (Transfer, error) {
	lm, ok := a.Backend.(LiveMigrator)
	if !ok {
		return Transfer{}, refusal.Conflict(api.CodeNotSupported, "Host "+a.Host+" runs the "+a.Backend.Name()+
			" backend, which cannot migrate a running guest.")
	}
	in, err := a.Records.TransferInput(ctx, a.Host, ask)
	if err != nil {
		return Transfer{}, fmt.Errorf("reading the migrating vTPM's record: %w", err)
	}
	v := in.Record
	if v == nil || v.Incarnation != ask.Incarnation {
		return Transfer{}, refusal.NotFound(api.CodeNotFound, "No such vTPM is live-migrating through host "+a.Host+".")
	}
	switch ask.Kind {
	case TransferPrepare:
		inc, err := lm.PrepareIncoming(ctx, v.VTPM(), in.Secret, v.EKs)
		if err != nil {
			return Transfer{}, err
		}
		data, err := json.Marshal(inc)
		return Transfer{Bundle: data}, err
	case TransferSend:
		var to Incoming
		if err := json.Unmarshal(in.Bundle, &to); err != nil || to.URI == "" {
			return Transfer{}, refusal.Invalid(api.CodeInvalidParameter, "The live migration's destination is not described.")
		}
		if err := a.sendLive(ctx, lm, v, to, ask); err != nil {
			return Transfer{}, err
		}
		a.mu.Lock()
		if held := a.held[v.InstanceID]; held != nil && held.Incarnation == v.Incarnation {
			delete(a.held, v.InstanceID)
		}
		a.forget(v.InstanceID)
		a.mu.Unlock()
		return Transfer{}, nil
	case TransferSettle:
		return Transfer{}, lm.SettleIncoming(ctx, v.VTPM())
	}
	return Transfer{}, lm.AbortIncoming(ctx, v.VTPM())
}

// cancelPoll is how often a source's agent, while libvirt migrates a
// guest, reads whether the server cancelled the send.
const cancelPoll = time.Second

// sendLive has lm migrate v's guest to to, answering send request ask; if
// the server cancels the send meanwhile (TransferInput.Cancel: the target
// went down), the context MigrateLive runs under ends, and libvirt's
// migration is aborted: the guest runs on here, unless it landed first
// (then MigrateLive succeeds all the same). A read that fails (the server
// restarting, say) cancels nothing; nor does the agent stopping: libvirt
// drives the migration, so sendLive returns (the send left unanswered, for
// the agent's next run, which finds where the guest went) and the
// migration goes on.
func (a *Agent) sendLive(ctx context.Context, lm LiveMigrator, v *Record, to Incoming, ask TransferAsk) error {
	sendCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	finished, migrated := make(chan struct{}), make(chan error, 1)
	go func() {
		err := lm.MigrateLive(sendCtx, v.VTPM(), to)
		close(finished)
		migrated <- err
	}()
	go func() {
		tick := time.NewTicker(cancelPoll)
		defer tick.Stop()
		for {
			select {
			case <-finished:
				cancel()
				return
			case <-ctx.Done():
				return // the agent stops; the migration goes on, and sendCtx with it
			case <-tick.C:
			}
			if in, err := a.Records.TransferInput(ctx, a.Host, ask); err == nil && in.Cancel {
				a.Log.Warn("live migration cancelled by the server: aborting libvirt's migration", "host", a.Host, "instance", v.InstanceID)
				cancel()
				return
			}
		}
	}()
	select {
	case err := <-migrated:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// export seals v's state, as the backend copies it, into a bundle of
// generation gen.
func (a *Agent) export(ctx context.Context, ex Exporter, v *Record, gen int64, secret []byte) (Transfer, error) {
	files, err := ex.Export(ctx, v.VTPM())
	if err != nil {
		return Transfer{}, err
	}
	b := &bundle.Bundle{
		Header: bundle.Header{InstanceID: v.InstanceID, Incarnation: v.Incarnation, SecretRef: v.SecretID, Generation: gen,
			Created: time.Now().UTC(), SourceHost: a.Host, Backend: a.Backend.Name()},
		Project: v.Project, Spec: v.Spec, EKs: bundleEKs(v.EKs), Files: files,
	}
	data, err := bundle.Seal(b, secret)
	if err != nil {
		return Transfer{}, err
	}
	return Transfer{Bundle: data}, nil
}

// importBundle opens the bundle of in as v's and has the backend
// replace v's state with it; the backend proves the
// state is v's TPM (its record's endorsement keys) before it takes its
// place.
func (a *Agent) importBundle(ctx context.Context, ex Exporter, v *Record, ask TransferAsk, in *TransferInput) error {
	b, err := bundle.Open(in.Bundle, in.Secret, v.InstanceID, v.Incarnation)
	switch {
	case errors.Is(err, bundle.ErrMismatch):
		return refusal.Conflict(api.CodeBundleMismatch, err.Error())
	case errors.Is(err, bundle.ErrCorrupt):
		return refusal.Conflict(api.CodeBundleCorrupt, err.Error())
	case err != nil:
		return err
	}
	if b.Generation != ask.Generation {
		return refusal.Conflict(api.CodeBundleMismatch, fmt.Sprintf("The bundle is generation %d, not the %d asked for.", b.Generation, ask.Generation))
	}
	return ex.Import(ctx, v.VTPM(), in.Secret, b.Files, v.EKs)
}

func bundleEKs(eks []EK) []bundle.EK {
	out := make([]bundle.EK, len(eks))
	for i, ek := range eks {
		out[i] = bundle.EK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: ek.PublicDER, CertDER: ek.CertDER}
	}
	return out
}

// carry takes each of asks for this run (Records.TakeTransfer), so that
// the watch hands it no more, and carries it out in a goroutine of wg,
// unless it is under way already. One answered or withdrawn since the
// watch read it is left. A take that fails otherwise does not hold the
// transfer up: it is carried out, and the watch, handing it again, takes
// it again.
func (a *Agent) carry(ctx context.Context, wg *sync.WaitGroup, asks []TransferAsk) error {
	var errs []error
	for _, ask := range asks {
		errs = append(errs, a.carryOne(ctx, wg, ask))
	}
	return errors.Join(errs...)
}

func (a *Agent) carryOne(ctx context.Context, wg *sync.WaitGroup, ask TransferAsk) error {
	err := a.Records.TakeTransfer(ctx, a.Host, ask)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		err = fmt.Errorf("taking the %s of %s: %w", ask.Kind, ask.InstanceID, err)
	}
	a.mu.Lock()
	busy := a.carrying[ask.ID]
	a.carrying[ask.ID] = true
	a.mu.Unlock()
	if busy {
		return err
	}
	slots := a.transferSlots
	if ask.Kind == TransferSend {
		slots = a.sendSlots
	}
	wg.Go(func() {
		defer func() {
			a.mu.Lock()
			delete(a.carrying, ask.ID)
			a.mu.Unlock()
		}()
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return
		}
		defer func() { <-slots }()
		if err := a.answerTransfer(ctx, ask); err != nil && ctx.Err() == nil {
			a.Log.Warn("answering a transfer", "host", a.Host, "instance", ask.InstanceID, "kind", ask.Kind, "err", err)
		}
	})
	return err
}

// unlockQueue unlocks the vTPM id and queues it to be reconciled if a
// worker found it held meanwhile.
func (a *Agent) unlockQueue(id string, unlock func() (missed bool)) {
	if unlock() {
		a.queue.add(id)
	}
}
