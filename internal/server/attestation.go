package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/store"
)

// nonceLifetime bounds how long a guest may take to quote.
const nonceLifetime = 5 * time.Minute

// staleAfter is how long a registered instance may go without genuine
// evidence before its verdict reads "stale": guest agents attest every 30 s
// by default, so this is several missed rounds.
const staleAfter = 3 * time.Minute

// Attestation error codes.
const (
	CodeInvalidAK        = "invalid_ak"
	CodeEKMismatch       = "ek_mismatch"
	CodeActivationFailed = "activation_failed"
	CodeNotRegistered    = "not_registered"
	CodeStaleNonce       = "stale_nonce"
	CodeNoEvidence       = "no_evidence"
)

// register checks the guest's AK and answers with a credential only the
// TPM vtpmd made for this instance can open, and only for this AK.
func (s *Server) register(w http.ResponseWriter, r *http.Request) error {
	var req api.RegisterRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	v, scope, err := s.lookup(r)
	if err != nil {
		return err
	}
	if req.EKKind == "" {
		req.EKKind = "rsa2048"
	}
	var ek *store.EK
	for i := range v.EKs {
		if v.EKs[i].Kind == req.EKKind {
			ek = &v.EKs[i]
		}
	}
	if ek == nil {
		return apiErr(http.StatusConflict, CodeNotReady, "The vTPM has no "+req.EKKind+" EK (phase "+string(v.Phase)+").")
	}
	if req.EKPublic != nil && !bytes.Equal(req.EKPublic, ek.PublicDER) {
		return apiErr(http.StatusForbidden, CodeEKMismatch, "This EK is not the one vtpmd made for instance "+v.InstanceID+"; registration refused.")
	}
	ak, err := attest.ParseAK(req.AKPublic)
	if err != nil {
		return apiErr(http.StatusBadRequest, CodeInvalidAK, err.Error())
	}
	ekPub, err := x509.ParsePKIXPublicKey(ek.PublicDER)
	if err != nil {
		return err
	}
	ch, err := attest.NewChallenge(ekPub, ak)
	if err != nil {
		return err
	}
	hash := sha256.Sum256(ch.Secret)
	err = s.updateAttestation(r.Context(), v, scope, "attestation key submitted", func(a *store.Attestation) error {
		*a = store.Attestation{InstanceID: v.InstanceID, EKKind: req.EKKind, AKPublic: req.AKPublic, ChallengeHash: hash[:],
			Verdict: "pending", PolicyPCRs: a.PolicyPCRs, PolicyEventLog: a.PolicyEventLog}
		return nil
	})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.CredentialChallenge{EKHandle: fmt.Sprintf("0x%08x", ek.Handle),
		CredentialBlob: ch.CredentialBlob, EncryptedSeed: ch.EncryptedSeed})
	return nil
}

// activate completes registration when the TPM gave the credential back.
func (s *Server) activate(w http.ResponseWriter, r *http.Request) error {
	var req api.ActivateRequest
	return s.attestationChange(w, r, &req, "attestation key registered", func(a *store.Attestation) error {
		if a.ChallengeHash == nil {
			return apiErr(http.StatusConflict, CodeNotRegistered, "No registration is waiting for a credential; register the AK first.")
		}
		got := sha256.Sum256(req.Secret)
		if subtle.ConstantTimeCompare(got[:], a.ChallengeHash) != 1 {
			return apiErr(http.StatusForbidden, CodeActivationFailed, "The credential does not match: the AK is not in the TPM vtpmd made for this instance.")
		}
		a.ChallengeHash, a.RegisteredAt = nil, time.Now().UTC()
		return nil
	})
}

// attestationChange decodes the body into req, applies fn to the
// instance's attestation record (see updateAttestation) and answers with
// the resulting status.
func (s *Server) attestationChange(w http.ResponseWriter, r *http.Request, req any, action string, fn func(*store.Attestation) error) error {
	if err := decode(w, r, req); err != nil {
		return err
	}
	v, scope, err := s.lookup(r)
	if err != nil {
		return err
	}
	var out *store.Attestation
	err = s.updateAttestation(r.Context(), v, scope, action, func(a *store.Attestation) error {
		out = a
		return fn(a)
	})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, attestationView(out, time.Now()))
	return nil
}

// nonce hands out the single-use nonce the next quote must answer.
func (s *Server) nonce(w http.ResponseWriter, r *http.Request) error {
	v, scope, err := s.lookup(r)
	if err != nil {
		return err
	}
	n := api.Nonce{Nonce: make([]byte, 32), ExpiresAt: time.Now().UTC().Add(nonceLifetime)}
	if _, err := rand.Read(n.Nonce); err != nil {
		return err
	}
	err = s.updateAttestation(r.Context(), v, scope, "", func(a *store.Attestation) error {
		if a.RegisteredAt.IsZero() {
			return apiErr(http.StatusConflict, CodeNotRegistered, "The instance has no registered attestation key.")
		}
		a.Nonce, a.NonceExpires = n.Nonce, n.ExpiresAt
		return nil
	})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, n)
	return nil
}

// evidence verifies a pushed quote and records the verdict. The nonce is
// spent whatever the outcome.
func (s *Server) evidence(w http.ResponseWriter, r *http.Request) error {
	var req api.EvidenceRequest
	return s.attestationChange(w, r, &req, "", func(a *store.Attestation) error {
		if a.RegisteredAt.IsZero() {
			return apiErr(http.StatusConflict, CodeNotRegistered, "The instance has no registered attestation key.")
		}
		fresh := a.Nonce != nil && bytes.Equal(a.Nonce, req.Nonce) && time.Now().Before(a.NonceExpires)
		a.Nonce = nil
		if !fresh {
			return apiErr(http.StatusConflict, CodeStaleNonce, "The evidence does not answer the current nonce (used, expired or never issued); ask for a new one.")
		}
		ak, err := attest.ParseAK(a.AKPublic)
		if err != nil {
			return err
		}
		prev := attest.State{EventLog: a.EventLog}
		if a.PCRs != nil {
			prev.Quote = &attest.Quote{Clock: a.Clock, ResetCount: a.ResetCount, RestartCount: a.RestartCount}
		}
		verdict, next := attest.Verify(ak, attest.Evidence{Attest: req.Attest, Signature: req.Signature, PCRs: req.PCRs, EventLog: req.EventLog},
			req.Nonce, prev, storedPolicy(a))
		record(a, verdict)
		if verdict.Genuine {
			q := next.Quote
			a.Clock, a.ResetCount, a.RestartCount, a.PCRs, a.EventLog = q.Clock, q.ResetCount, q.RestartCount, q.PCRs, next.EventLog
		}
		return nil
	})
}

// record puts a verdict on a.
func record(a *store.Attestation, v attest.Verdict) {
	a.Reasons, a.VerifiedAt = v.Reasons, time.Now().UTC()
	switch {
	case v.Trusted:
		a.Verdict = "trusted"
	case v.Genuine && len(a.PolicyPCRs) == 0:
		a.Verdict = "pending"
	default:
		a.Verdict = "untrusted"
	}
}

// storedPolicy is the policy kept with a; nil when there is none.
func storedPolicy(a *store.Attestation) *attest.Policy {
	if len(a.PolicyPCRs) == 0 {
		return nil
	}
	return &attest.Policy{PCRs: a.PolicyPCRs, EventLog: a.PolicyEventLog}
}

// setPolicy learns the policy from the last accepted evidence and judges
// that evidence by it at once.
func (s *Server) setPolicy(w http.ResponseWriter, r *http.Request) error {
	var req api.PolicyRequest
	return s.attestationChange(w, r, &req, "policy learned", func(a *store.Attestation) error {
		if !req.Learn {
			return apiErr(http.StatusBadRequest, CodeInvalidParameter, "Only learning a policy from the last accepted evidence is supported: set \"learn\": true.")
		}
		for _, i := range req.PCRs {
			if i < 0 || i > 23 {
				return apiErr(http.StatusBadRequest, CodeInvalidParameter, fmt.Sprintf("PCR %d does not exist (0–23).", i))
			}
		}
		if a.PCRs == nil {
			return apiErr(http.StatusConflict, CodeNoEvidence, "No evidence has been accepted yet to learn from.")
		}
		events, err := attest.ParseEventLog(a.EventLog)
		if err != nil {
			return err
		}
		which := req.PCRs
		if which == nil { // every PCR the evidence quoted
			for i := range a.PCRs {
				which = append(which, i)
			}
		}
		p := attest.Learn(a.PCRs, a.EventLog, which)
		a.PolicyPCRs, a.PolicyEventLog = p.PCRs, p.EventLog
		record(a, attest.Judge(p, a.PCRs, events))
		return nil
	})
}

func (s *Server) getAttestation(w http.ResponseWriter, r *http.Request) error {
	_, a, err := s.lookupAttestation(r)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, attestationView(a, time.Now()))
	return nil
}

// lookupAttestation reads the vTPM the request names and its attestation
// record; 404 if the instance never registered.
func (s *Server) lookupAttestation(r *http.Request) (v *store.VTPM, a *store.Attestation, err error) {
	if v, _, err = s.lookup(r); err != nil {
		return nil, nil, err
	}
	err = s.Store.View(r.Context(), func(tx *store.Tx) error {
		a, err = tx.GetAttestation(v.InstanceID)
		return err
	})
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil, apiErr(http.StatusNotFound, CodeNotRegistered, "The instance has never registered an attestation key.")
	}
	return v, a, err
}

// tokenLifetime bounds how long a relying party may rely on a signed verdict.
const tokenLifetime = 5 * time.Minute

// token is the attestation status as a signed JWT (ES256) that a relying
// party checks offline against GET /.well-known/vtpmd/jwks.json.
func (s *Server) token(w http.ResponseWriter, r *http.Request) error {
	if s.Verdicts == nil {
		return apiErr(http.StatusConflict, CodeNotSupported, "This server does not sign verdicts.")
	}
	v, a, err := s.lookupAttestation(r)
	if err != nil {
		return err
	}
	tok, err := s.Verdicts.Sign(verdictClaims(v, a, time.Now()))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.VerdictToken{Token: tok})
	return nil
}

// verdictClaims are a verdict's claims as tokens and webhooks carry them.
func verdictClaims(v *store.VTPM, a *store.Attestation, now time.Time) map[string]any {
	view := attestationView(a, now)
	return map[string]any{
		"iss": "vtpmd", "sub": v.InstanceID, "iat": now.Unix(), "exp": now.Add(tokenLifetime).Unix(),
		"project": v.Project, "host": v.Host, "verdict": view.Verdict, "reasons": view.Reasons,
		"verified_at": view.VerifiedAt, "policy_pcrs": view.PolicyPCRs,
	}
}

func (s *Server) jwks(w http.ResponseWriter, r *http.Request) error {
	if s.Verdicts == nil {
		return apiErr(http.StatusNotFound, CodeNotFound, "This server does not sign verdicts.")
	}
	w.Header().Set("Content-Type", "application/json")
	_, err := w.Write(s.Verdicts.JWKS())
	return err
}

// updateAttestation applies fn to the instance's attestation record (a new
// one if none) in one transaction, with an event when action is set. The
// record is written even when fn refuses, so that a spent nonce stays
// spent; fn's error is returned after.
func (s *Server) updateAttestation(ctx context.Context, v *store.VTPM, scope, action string, fn func(*store.Attestation) error) error {
	id := v.InstanceID
	var refusal error
	var changed *store.Attestation
	err := s.Store.Update(ctx, func(tx *store.Tx) error {
		a, err := tx.GetAttestation(id)
		existed := err == nil
		if errors.Is(err, store.ErrNotFound) {
			a, err = &store.Attestation{InstanceID: id, Verdict: "pending"}, nil
		}
		if err != nil {
			return err
		}
		before := a.Verdict
		if refusal = fn(a); refusal != nil {
			var ae *APIError
			if !errors.As(refusal, &ae) || !existed {
				return nil // a fault, or nothing to keep: write nothing
			}
		}
		if err := tx.PutAttestation(a); err != nil {
			return err
		}
		if refusal == nil && a.Verdict != before {
			action = "attestation " + a.Verdict
			changed = a
		}
		if action == "" || refusal != nil {
			return nil
		}
		return tx.AppendEvent(store.Event{Actor: actor(scope), InstanceID: id, Action: action, Detail: detail(a)})
	})
	if err != nil {
		return err
	}
	if changed != nil {
		s.Webhook.notify(verdictClaims(v, changed, time.Now()))
	}
	return refusal
}

func detail(a *store.Attestation) string {
	if len(a.Reasons) > 0 {
		return a.Reasons[0]
	}
	return a.Verdict
}

// attestationView is the status as of now: a registered instance whose
// last genuine evidence (or registration) is older than staleAfter is
// "stale", whatever its last verdict said.
func attestationView(a *store.Attestation, now time.Time) api.Attestation {
	out := api.Attestation{InstanceID: a.InstanceID, State: "unregistered", RegisteredAt: a.RegisteredAt, Verdict: a.Verdict,
		Reasons: a.Reasons, VerifiedAt: a.VerifiedAt, PCRs: a.PCRs}
	switch {
	case a.ChallengeHash != nil:
		out.State = "challenged"
	case !a.RegisteredAt.IsZero():
		out.State = "registered"
		last := a.RegisteredAt
		if a.VerifiedAt.After(last) {
			last = a.VerifiedAt
		}
		if now.Sub(last) > staleAfter {
			out.Verdict = "stale"
			out.Reasons = []string{fmt.Sprintf("no evidence since %s (the last verdict was %s)", last.Format(time.RFC3339), a.Verdict)}
		}
	}
	for i := range a.PolicyPCRs {
		out.PolicyPCRs = append(out.PolicyPCRs, i)
	}
	slices.Sort(out.PolicyPCRs)
	return out
}
