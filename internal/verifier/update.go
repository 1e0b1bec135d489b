package verifier

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// Every change of an attestation record goes through update: one
// transaction reads the record, applies the change, writes it with its
// staleness deadline, and when the verdict changed records the events and
// queues the webhooks the change makes.

// keep is a refusal after which the attestation record is written all
// the same, because the change made what must last (a spent nonce).
type keep struct{ error }

func (k keep) Unwrap() error { return k.error }

// update applies fn to the subject's attestation record (a new one if
// none) in one transaction, with an event when action is set, and puts
// the resulting status in st (when not nil). When fn refuses, the record
// is left as it was, unless the refusal is a keep (a spent nonce stays
// spent); fn's error is returned after. So a refused caller, a stranger
// without the agent's token above all, writes nothing. A verdict change
// is an event and a webhook (queued in the outbox in the same
// transaction), for a host on every instance it runs; a change that leaves
// an instance's overall answer untrusted revokes the secrets released to
// it (revokeReleases).
func (v *Verifier) update(ctx context.Context, sub Subject, action string, fn func(*store.Attestation) error, st *Status) error {
	var refused error
	err := v.notifying(ctx, func(tx *store.Tx) ([]map[string]any, error) {
		if err := sameVTPM(tx, sub); err != nil {
			return nil, err
		}
		a, err := tx.GetAttestation(sub.key)
		existed := err == nil
		if errors.Is(err, store.ErrNotFound) {
			a, err = &store.Attestation{InstanceID: sub.key, Verdict: store.VerdictPending}, nil
		}
		if err != nil {
			return nil, err
		}
		before := a.Verdict
		if refused = fn(a); refused != nil {
			if k := (keep{}); !errors.As(refused, &k) || !existed {
				return nil, nil // nothing to keep: write nothing
			}
		}
		a.StaleAt = v.staleAt(a)
		if err := tx.PutAttestation(a); err != nil {
			return nil, err
		}
		if refused != nil {
			return nil, nil
		}
		now := v.now()
		changed := a.Verdict != before
		var status Status
		if st != nil || (changed && sub.vtpm != nil) {
			if status, err = v.status(tx, sub, a, now); err != nil {
				return nil, err
			}
			if st != nil {
				*st = status
			}
		}
		acts := []string{action}
		if changed {
			acts = append(acts, "attestation "+string(a.Verdict))
		}
		for _, act := range acts {
			if act == "" {
				continue
			}
			who := sub.actor
			if who == "" {
				who = byVTPMD
			}
			if err := tx.AppendEvent(store.Event{Actor: who, InstanceID: sub.key, Action: act, Detail: detail(a.Verdict, a.Reasons)}); err != nil {
				return nil, err
			}
		}
		switch {
		case !changed:
			return nil, nil
		case sub.vtpm != nil:
			note := claims(sub.vtpm, status, now)
			return []map[string]any{note}, v.revokeReleases(tx, sub.vtpm, status, note)
		}
		return v.hostVerdictNotes(tx, sub.host, a.Verdict, a.Reasons)
	})
	if err != nil {
		return err
	}
	return refused
}

// attestationAction reports whether an event's action is attestation
// history: the actions update and Forget record.
func attestationAction(action string) bool {
	return strings.HasPrefix(action, "attestation ") || strings.HasPrefix(action, "host attestation ") || strings.HasPrefix(action, "policy ")
}

// sameVTPM refuses a change to the attestation of a vTPM that was deleted
// since the request read it: its instance id may have another vTPM now,
// maybe another project's, whose attestation it is not.
func sameVTPM(tx *store.Tx, sub Subject) error {
	if sub.vtpm == nil {
		return nil
	}
	vt, err := tx.GetVTPM(sub.key)
	if err == nil && vt.Incarnation != sub.vtpm.Incarnation {
		err = fmt.Errorf("vtpm %s of incarnation %s: %w", sub.key, sub.vtpm.Incarnation, store.ErrNotFound)
	}
	return err
}

// notifying runs fn in one transaction; the verdict changes it returns
// are queued for the webhook in that same transaction, whose commit wakes
// the deliverers (store.OutboxChanged).
func (v *Verifier) notifying(ctx context.Context, fn func(tx *store.Tx) ([]map[string]any, error)) error {
	return v.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		notes, err := fn(tx)
		if err != nil {
			return err
		}
		for _, n := range notes {
			if err := v.cfg.Webhook.Enqueue(tx, n); err != nil {
				return err
			}
		}
		return nil
	})
}

// Forget drops a host's attestation record (the TPM it is pinned to, its
// AK, policy and verdict) so that a replaced TPM can register. Until one
// does, its instances read their host as unattested.
func (v *Verifier) Forget(ctx context.Context, sub Subject) error {
	if sub.host == "" {
		return fmt.Errorf("forgetting the attestation of instance %s: only a host's is forgotten", sub.key)
	}
	const why = "the host's TPM registration was removed"
	return v.notifying(ctx, func(tx *store.Tx) ([]map[string]any, error) {
		if _, err := tx.GetAttestationWithoutLogs(sub.key); errors.Is(err, store.ErrNotFound) {
			return nil, refusal.NotFound(api.CodeNotRegistered, "The host has never registered an attestation key.")
		} else if err != nil {
			return nil, err
		}
		if err := tx.DeleteAttestation(sub.key); err != nil {
			return nil, err
		}
		if err := tx.AppendEvent(store.Event{Actor: sub.actor, InstanceID: sub.key, Action: "attestation forgotten", Detail: why}); err != nil {
			return nil, err
		}
		return v.hostVerdictNotes(tx, sub.host, store.VerdictUnattested, []string{why})
	})
}

// hostVerdictNotes are the webhook payloads of host's verdict changing to
// verdict: one for each registered instance on it, whose overall answer
// changes with it, each also an event.
func (v *Verifier) hostVerdictNotes(tx *store.Tx, host string, verdict store.Verdict, reasons []string) ([]map[string]any, error) {
	now := v.now()
	vs, err := tx.ListVTPMs(store.Filter{Host: host})
	if err != nil {
		return nil, err
	}
	var notes []map[string]any
	for _, vt := range vs {
		va, err := tx.GetAttestationWithoutLogs(vt.InstanceID)
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		st, err := v.status(tx, Subject{key: vt.InstanceID, vtpm: vt}, va, now)
		if err != nil {
			return nil, err
		}
		if err := tx.AppendEvent(store.Event{Actor: byVTPMD, InstanceID: vt.InstanceID, Action: "host attestation " + string(verdict), Detail: detail(verdict, reasons)}); err != nil {
			return nil, err
		}
		note := claims(vt, st, now)
		if err := v.revokeReleases(tx, vt, st, note); err != nil {
			return nil, err
		}
		notes = append(notes, note)
	}
	return notes, nil
}

// detail is an event's detail of a verdict: its first reason.
func detail(verdict store.Verdict, reasons []string) string {
	if len(reasons) > 0 {
		return reasons[0]
	}
	return string(verdict)
}

// claims are an instance's verdict as tokens and webhooks carry them:
// overall is the answer to rely on.
func claims(vt *store.VTPM, st Status, now time.Time) map[string]any {
	c := map[string]any{
		"iss": attest.TokenIssuer, "sub": vt.InstanceID, "iat": now.Unix(), "exp": now.Add(attest.TokenLifetime).Unix(),
		"project": vt.Project, "host": vt.Host, "verdict": st.Verdict, "reasons": st.Reasons,
		"verified_at": st.VerifiedAt, "policy_pcrs": st.PolicyPCRs,
		"overall": st.Overall, "summary": st.Summary,
	}
	if st.Host != nil {
		c["host_verdict"] = st.Host.Verdict
	}
	if st.Provisioning != nil {
		c["provisioning_verified"] = st.Provisioning.Verified
	}
	return c
}

var errNoSigner = refusal.Conflict(api.CodeNotSupported, "This server does not sign verdicts.")

// Token is the attestation status of instance id, as c may see it, as a
// signed JWT (ES256) that a relying party checks offline against JWKS.
func (v *Verifier) Token(ctx context.Context, c tenant.Caller, id string) (string, error) {
	if v.cfg.Signer == nil {
		return "", errNoSigner
	}
	sub, err := v.Instance(ctx, c, id)
	if err != nil {
		return "", err
	}
	st, err := v.Status(ctx, sub)
	if err != nil {
		return "", err
	}
	return v.cfg.Signer.Sign(claims(sub.vtpm, st, v.now()))
}

// JWKS is the verifier's public keys, which verdict tokens verify against.
func (v *Verifier) JWKS() ([]byte, error) {
	if v.cfg.Signer == nil {
		return nil, refusal.NotFound(api.CodeNotFound, "This server does not sign verdicts.")
	}
	return v.cfg.Signer.JWKS(), nil
}
