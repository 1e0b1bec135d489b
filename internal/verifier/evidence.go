package verifier

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/bearer"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
)

// nonceLifetime bounds how long an agent may take to quote.
const nonceLifetime = 5 * time.Minute

func notRegistered(sub Subject) error {
	return refusal.Conflict(api.CodeNotRegistered, "The "+sub.kind()+" has no registered attestation key.")
}

// fromAgent refuses a request that does not carry the bearer token of the
// subject's registered agent.
func fromAgent(token string, a *store.Attestation) error {
	if !bearer.Matches(token, a.AgentTokenHash) {
		return refusal.Unauthenticated(api.CodeUnauthenticated, "Only the registered agent may do this: send the token it got at registration (Authorization: Bearer).")
	}
	return nil
}

// registered reads the subject's attestation record, which must have a
// registered AK.
func (v *Verifier) registered(ctx context.Context, sub Subject) (a *store.Attestation, err error) {
	err = v.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { a, err = registeredIn(tx, sub); return err })
	return a, err
}

// registeredIn is registered, read in tx.
func registeredIn(tx *store.Tx, sub Subject) (*store.Attestation, error) {
	a, err := tx.GetAttestationWithoutLogs(sub.key)
	if errors.Is(err, store.ErrNotFound) || err == nil && a.RegisteredAt.IsZero() {
		return nil, notRegistered(sub)
	}
	return a, err
}

// Authorize refuses a request that is not from the subject's registered
// agent (agentToken is the bearer token it sent, "" for none). Evidence
// checks this itself; a caller checks it first where reading the request
// costs (evidence may be MiBs), so that only the agent makes it read.
func (v *Verifier) Authorize(ctx context.Context, sub Subject, agentToken string) error {
	a, err := v.registered(ctx, sub)
	if err != nil {
		return err
	}
	return fromAgent(agentToken, a)
}

// Nonce hands the subject's registered agent the single-use nonce its
// next quote must answer.
func (v *Verifier) Nonce(ctx context.Context, sub Subject, agentToken string) (api.Nonce, error) {
	n := api.Nonce{Nonce: make([]byte, 32), ExpiresAt: v.now().Add(nonceLifetime)}
	if _, err := rand.Read(n.Nonce); err != nil {
		return n, err
	}
	err := v.update(ctx, sub, "", func(a *store.Attestation) error {
		if a.RegisteredAt.IsZero() {
			return notRegistered(sub)
		}
		if err := fromAgent(agentToken, a); err != nil {
			return err
		}
		a.Nonce, a.NonceExpires = n.Nonce, n.ExpiresAt
		return nil
	}, nil)
	return n, err
}

// Evidence verifies a quote the subject's registered agent pushed and
// records the verdict, in this order:
//
//  1. the subject has a registered AK, and the request carries its agent's
//     token (else nothing changes: a stranger cannot spend the nonce);
//  2. the evidence answers the current nonce, unexpired (else the nonce is
//     spent all the same);
//  3. it has a firmware event log, and an IMA continuation starts from the
//     entry the verifier holds: evidence refused here leaves the nonce
//     good, to come again with the same quote;
//  4. attest.Verify: quote, counters, event log, IMA log, policy. The
//     nonce is spent whatever the outcome.
//
// Genuine evidence is kept (counters, PCRs, logs) for the next; the
// status carries the policy's mismatches.
func (v *Verifier) Evidence(ctx context.Context, sub Subject, agentToken string, req api.EvidenceRequest) (Status, error) {
	var st Status
	var judged attest.Verdict
	err := v.update(ctx, sub, "", func(a *store.Attestation) error {
		var err error
		judged, err = v.judge(sub, a, agentToken, &req)
		return err
	}, &st)
	st.Mismatches = judged.Mismatches
	return st, err
}

// judge verifies req for the subject of a and records the verdict on a,
// with what the verifier keeps for the next evidence.
func (v *Verifier) judge(sub Subject, a *store.Attestation, agentToken string, req *api.EvidenceRequest) (attest.Verdict, error) {
	if a.RegisteredAt.IsZero() {
		return attest.Verdict{}, notRegistered(sub)
	}
	if err := fromAgent(agentToken, a); err != nil {
		return attest.Verdict{}, err // before the nonce is spent: a stranger cannot spend it
	}
	if fresh := a.Nonce != nil && bytes.Equal(a.Nonce, req.Nonce) && v.now().Before(a.NonceExpires); !fresh {
		a.Nonce = nil
		return attest.Verdict{}, keep{refusal.Conflict(api.CodeStaleNonce, "The evidence does not answer the current nonce (used, expired or never issued); ask for a new one.")}
	}
	// Evidence refused from here to the nonce's spending may come again
	// with the same quote.
	if len(req.EventLog) == 0 {
		// Nothing to replay the quote against: not evidence to judge.
		return attest.Verdict{}, refusal.Invalid(api.CodeNoEventLog, "The evidence has no firmware event log (event_log); send the one the kernel exposes with the quote. The nonce is still good.")
	}
	switch {
	case req.IMAOffset < 0:
		return attest.Verdict{}, refusal.Invalid(api.CodeInvalidParameter, "ima_offset is the number of IMA entries the log continues from, 0 or more.")
	case req.IMAOffset > 0 && req.IMAOffset != a.IMAEntries:
		return attest.Verdict{}, refusal.Conflict(api.CodeFullIMALogRequired, fmt.Sprintf(
			"The IMA log continues from entry %d, but the verifier holds %d entries of it: send the whole log (ima_offset 0), or the entries from %d on. The nonce is still good.",
			req.IMAOffset, a.IMAEntries, a.IMAEntries))
	}
	a.Nonce = nil
	ak, err := v.aks.parse(sub.key, a.AKPublic)
	if err != nil {
		return attest.Verdict{}, err
	}
	// The subject's log parsed before, for it or for another instance of
	// its image: a pure function of the bytes, confirmed byte for byte.
	prev := attest.State{Log: v.logs.Lookup(req.EventLog)}
	if a.PCRs != nil {
		prev.Quote = &attest.Quote{Clock: a.Clock, ResetCount: a.ResetCount, RestartCount: a.RestartCount, PCRs: a.PCRs}
	}
	if req.IMAOffset > 0 {
		if prev.IMA, prev.IMALog, err = attest.ParseIMAPrefix(a.IMALog, a.IMAEntries); err != nil {
			return attest.Verdict{}, fmt.Errorf("the IMA log kept for %s: %w", a.InstanceID, err)
		}
	}
	verdict, next := attest.Verify(ak, attest.Evidence{Attest: req.Attest, Signature: req.Signature, PCRs: req.PCRs,
		EventLog: req.EventLog, IMALog: req.IMALog, IMAOffset: req.IMAOffset}, req.Nonce, prev, storedPolicy(a))
	v.record(a, verdict)
	if verdict.Genuine && next.Log != prev.Log {
		// Kept only once a quote vouched for it (signed, fresh, replayed
		// to): a stranger's garbage never takes another log's room.
		v.logs.Add(next.Log)
	}
	if verdict.Genuine {
		a.EvidenceAt = v.now()
		q := next.Quote
		a.Clock, a.ResetCount, a.RestartCount, a.PCRs, a.EventLog = q.Clock, q.ResetCount, q.RestartCount, q.PCRs, next.Log.Bytes()
		a.IMALog, a.IMAEntries = next.IMALog, len(next.IMA)
	}
	return verdict, nil
}

// record puts a judgement on a: trusted if it met the policy; pending if
// genuine with no policy to judge it by; else untrusted.
func (v *Verifier) record(a *store.Attestation, j attest.Verdict) {
	a.Reasons, a.VerifiedAt = j.Reasons, v.now()
	switch {
	case j.Trusted:
		a.Verdict = store.VerdictTrusted
	case j.Genuine && storedPolicy(a) == nil:
		a.Verdict = store.VerdictPending
	default:
		a.Verdict = store.VerdictUntrusted
	}
}

// storedPolicy is the policy kept with a; nil when there is none.
func storedPolicy(a *store.Attestation) *attest.Policy {
	if len(a.PolicyPCRs) == 0 && len(a.PolicyDigests) == 0 {
		return nil
	}
	return &attest.Policy{PCRs: a.PolicyPCRs, Digests: a.PolicyDigests, EventLog: a.PolicyEventLog}
}

// BoundEnrolment decides whether host's agent may enrol with agentToken
// (the bearer token it sent, "" for none): a host whose own TPM is
// registered enrols only with the token that TPM earned at activation, so
// a join token carried to another machine enrols nothing; a host with no
// registered TPM enrols unbound. It reports whether the enrolment is bound.
func (v *Verifier) BoundEnrolment(ctx context.Context, host, agentToken string) (bound bool, err error) {
	sub := Subject{key: store.HostKey(host), host: host}
	a, err := v.registered(ctx, sub)
	var re *refusal.Error
	switch {
	case errors.As(err, &re) && re.Code == api.CodeNotRegistered && agentToken == "":
		return false, nil
	case errors.As(err, &re) && re.Code == api.CodeNotRegistered:
		return false, refusal.Unauthenticated(api.CodeUnauthenticated, "The host has no registered TPM for this agent token to belong to.")
	case err != nil:
		return false, err
	case agentToken == "":
		return false, refusal.Forbidden(api.CodeHostTPMRequired, "Host "+host+"'s TPM is registered: its agent enrols with the token that TPM earned (vtpmd agent --host-tpm), from that host.")
	}
	return true, fromAgent(agentToken, a)
}
