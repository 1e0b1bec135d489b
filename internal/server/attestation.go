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
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/store"
)

// nonceLifetime bounds how long a guest may take to quote.
const nonceLifetime = 5 * time.Minute

// DefaultStaleAfter is how long a registered instance may go without
// genuine evidence before its verdict turns "stale": guest agents attest
// every 30 s by default, so this is several missed rounds.
const DefaultStaleAfter = 3 * time.Minute

// Attestation error codes.
const (
	CodeInvalidAK        = "invalid_ak"
	CodeEKMismatch       = "ek_mismatch"
	CodeEKUntrusted      = "ek_untrusted"
	CodeActivationFailed = "activation_failed"
	CodeNotRegistered    = "not_registered"
	CodeStaleNonce       = "stale_nonce"
	CodeNoEvidence       = "no_evidence"
	CodeUnauthenticated  = "unauthenticated"
)

// Evidence refused before it is judged (the nonce stays good).
const (
	CodeNoEventLog         = "no_event_log" // no firmware event log to replay the quote against
	CodeFullIMALogRequired = api.CodeFullIMALogRequired
)

// subject is what an attestation request is about: an instance's vTPM
// (vtpm set) or a host's own TPM (host set).
type subject struct {
	key   string // the attestation record's key
	vtpm  *store.VTPM
	host  string
	scope string
	actor string // who asks, for the event log; "" for vtpmd itself
}

func (sub subject) kind() string {
	if sub.vtpm != nil {
		return "instance"
	}
	return "host"
}

// subject reads the instance or host the request names. A host's own
// attestation is the operator's business: a project-scoped caller sees it
// only through its instances' status.
func (s *Server) subject(r *http.Request) (subject, error) {
	name := r.PathValue("name")
	if name == "" {
		v, scope, err := s.lookup(r)
		if err != nil {
			return subject{}, err
		}
		return subject{key: v.InstanceID, vtpm: v, scope: scope, actor: actor(r, scope)}, nil
	}
	scope, err := project(r)
	if err != nil {
		return subject{}, err
	}
	if scope != "" {
		return subject{}, apiErr(http.StatusForbidden, CodeForbidden, "A host's own attestation is for the operator; a project sees it in its instances' attestation status.")
	}
	err = s.Store.View(r.Context(), func(tx *store.Tx) error { _, err := tx.GetHost(name); return err })
	if errors.Is(err, store.ErrNotFound) {
		return subject{}, apiErr(http.StatusNotFound, CodeNotFound, "No such host.")
	}
	return subject{key: store.HostKey(name), host: name, actor: actor(r, "")}, err
}

// register checks the AK and answers with a credential only the TPM of the
// registered EK can open, and only for this AK, with the ticket that says
// what it registers (see ticket). An instance's EK must be the one vtpmd
// made for it; a host's, one its certificate vouches for. Nothing is
// written: the record changes only when the TPM proves the registration.
func (s *Server) register(w http.ResponseWriter, r *http.Request) error {
	var req api.RegisterRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	var ekDER []byte
	var ch api.CredentialChallenge
	if sub.vtpm != nil {
		ek, err := instanceEK(sub.vtpm, &req)
		if err != nil {
			return err
		}
		ekDER, ch.EKHandle = ek.PublicDER, fmt.Sprintf("0x%08x", ek.Handle)
	} else {
		if ekDER, err = s.hostEK(&req); err != nil {
			return err
		}
		if err := s.sameHostTPM(r.Context(), sub, ekDER); err != nil {
			return err
		}
	}
	ak, err := attest.ParseAK(req.AKPublic)
	if err != nil {
		return apiErr(http.StatusBadRequest, CodeInvalidAK, err.Error())
	}
	ekPub, err := x509.ParsePKIXPublicKey(ekDER)
	if err != nil {
		return err
	}
	now := time.Now().UTC()
	t := ticket{Subject: sub.key, IssuedAt: now, Expires: now.Add(ticketLifetime), EKKind: req.EKKind, EK: ekDER, AK: req.AKPublic}
	raw, secret, err := t.issue(s.ticketKey)
	if err != nil {
		return err
	}
	c, err := attest.NewChallenge(ekPub, ak, secret)
	if err != nil {
		return err
	}
	ch.CredentialBlob, ch.EncryptedSeed, ch.Ticket = c.CredentialBlob, c.EncryptedSeed, raw
	writeJSON(w, http.StatusOK, ch)
	return nil
}

// sameHostTPM refuses a host's registration with another TPM than the one
// it registered with (vtpmctl host forget first, after replacing it).
func (s *Server) sameHostTPM(ctx context.Context, sub subject, ekDER []byte) error {
	return s.Store.View(ctx, func(tx *store.Tx) error {
		a, err := tx.GetAttestation(sub.key)
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		if err == nil && a.EKPublic != nil && !bytes.Equal(a.EKPublic, ekDER) {
			return apiErr(http.StatusForbidden, CodeEKMismatch, "Host "+sub.host+" registered with another TPM; registration refused.")
		}
		return err
	})
}

// instanceEK is the EK vtpmd made for v that the registration asks for:
// of the kind req names, else of the kind of the EK it sends (its key
// says which), else the RSA one. It sets req.EKKind to that kind.
func instanceEK(v *store.VTPM, req *api.RegisterRequest) (*store.EK, error) {
	if req.EKKind != "" && req.EKKind != attest.EKKindRSA2048 && req.EKKind != attest.EKKindECCP256 {
		return nil, apiErr(http.StatusBadRequest, CodeInvalidParameter, "ek_kind is "+attest.EKKindRSA2048+" or "+attest.EKKindECCP256+", the EKs vtpmd makes.")
	}
	if req.EKPublic != nil {
		pub, err := x509.ParsePKIXPublicKey(req.EKPublic)
		if err != nil {
			return nil, apiErr(http.StatusBadRequest, CodeInvalidParameter, "ek_public is not a PKIX public key: "+err.Error())
		}
		kind, err := attest.EKKind(pub)
		switch {
		case err != nil:
			return nil, apiErr(http.StatusBadRequest, CodeInvalidParameter, "ek_public is no EK vtpmd makes: "+err.Error())
		case req.EKKind == "":
			req.EKKind = kind
		case req.EKKind != kind:
			return nil, apiErr(http.StatusBadRequest, CodeInvalidParameter, "ek_kind is "+req.EKKind+", but ek_public is an "+kind+" key.")
		}
	}
	if req.EKKind == "" {
		req.EKKind = attest.EKKindRSA2048
	}
	for i := range v.EKs {
		if v.EKs[i].Kind != req.EKKind {
			continue
		}
		if req.EKPublic != nil && !bytes.Equal(req.EKPublic, v.EKs[i].PublicDER) {
			return nil, apiErr(http.StatusForbidden, CodeEKMismatch, "This "+req.EKKind+" EK is not the one vtpmd made for instance "+v.InstanceID+"; registration refused.")
		}
		return &v.EKs[i], nil
	}
	return nil, apiErr(http.StatusConflict, CodeNotReady, "The vTPM has no "+req.EKKind+" EK (phase "+string(v.Phase)+").")
}

// hostEK is the EK a host's TPM registers with: the one its certificate,
// which must chain to the configured host EK CA, certifies.
func (s *Server) hostEK(req *api.RegisterRequest) ([]byte, error) {
	if req.EKCertificate == nil {
		return nil, apiErr(http.StatusBadRequest, CodeInvalidParameter, "A host registers with its TPM's EK certificate (ek_certificate).")
	}
	pub, err := attest.VerifyEKCertificate(req.EKCertificate, s.HostEKRoots)
	if err != nil {
		return nil, apiErr(http.StatusForbidden, CodeEKUntrusted, "The host's EK certificate is not vouched for by a configured CA: "+err.Error())
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	if req.EKPublic != nil && !bytes.Equal(req.EKPublic, der) {
		return nil, apiErr(http.StatusForbidden, CodeEKMismatch, "The EK is not the one the EK certificate certifies; registration refused.")
	}
	return der, nil
}

// activate completes a registration when the TPM gave the credential back:
// the ticket's AK becomes the registered one and its agent gets a bearer
// token. The TPM's counters are kept, so registering again cannot hide a
// rollback. A ticket serves once: a registration newer than the ticket
// refuses it.
func (s *Server) activate(w http.ResponseWriter, r *http.Request) error {
	var req api.ActivateRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	t, err := redeem(s.ticketKey, req.Ticket, req.Secret, sub.key, time.Now())
	if err != nil {
		return err
	}
	token, tokenHash, err := newBearer()
	if err != nil {
		return err
	}
	out := api.Activation{AgentToken: token}
	err = s.updateAttestation(r.Context(), sub, "attestation key registered", func(a *store.Attestation) error {
		if !a.RegisteredAt.Before(t.IssuedAt) {
			return apiErr(http.StatusConflict, CodeNotRegistered, "This registration was activated already, or a newer one was; register again.")
		}
		if sub.host != "" && a.EKPublic != nil && !bytes.Equal(a.EKPublic, t.EK) {
			return apiErr(http.StatusForbidden, CodeEKMismatch, "Host "+sub.host+" registered with another TPM; registration refused.")
		}
		a.AKPublic, a.EKKind, a.AgentTokenHash, a.RegisteredAt = t.AK, t.EKKind, tokenHash, time.Now().UTC()
		if sub.host != "" {
			a.EKPublic = t.EK
		}
		a.Nonce = nil
		a.Verdict, a.Reasons = "pending", []string{"registered; waiting for evidence"}
		return nil
	}, &out.Attestation)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// fromAgent refuses a request that does not carry the bearer token of
// the subject's registered agent.
func fromAgent(r *http.Request, a *store.Attestation) error {
	got, ok := bearerHash(r)
	if !ok || a.AgentTokenHash == nil || subtle.ConstantTimeCompare(got, a.AgentTokenHash) != 1 {
		return apiErr(http.StatusUnauthorized, CodeUnauthenticated, "Only the registered agent may do this: send the token it got at registration (Authorization: Bearer).")
	}
	return nil
}

// nonce hands out the single-use nonce the next quote must answer.
func (s *Server) nonce(w http.ResponseWriter, r *http.Request) error {
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	n := api.Nonce{Nonce: make([]byte, 32), ExpiresAt: time.Now().UTC().Add(nonceLifetime)}
	if _, err := rand.Read(n.Nonce); err != nil {
		return err
	}
	err = s.updateAttestation(r.Context(), sub, "", func(a *store.Attestation) error {
		if a.RegisteredAt.IsZero() {
			return apiErr(http.StatusConflict, CodeNotRegistered, "The "+sub.kind()+" has no registered attestation key.")
		}
		if err := fromAgent(r, a); err != nil {
			return err
		}
		a.Nonce, a.NonceExpires = n.Nonce, n.ExpiresAt
		return nil
	}, nil)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, n)
	return nil
}

// evidence verifies a pushed quote and records the verdict. The nonce is
// spent whatever the outcome, once the evidence is judged: evidence
// refused before (no event log, an IMA continuation the verifier cannot
// take) leaves it good. Its body may be MiBs (an IMA log): it is read
// only for the registered agent.
func (s *Server) evidence(w http.ResponseWriter, r *http.Request) error {
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	err = s.Store.View(r.Context(), func(tx *store.Tx) error {
		a, err := tx.GetAttestation(sub.key)
		if errors.Is(err, store.ErrNotFound) || err == nil && a.RegisteredAt.IsZero() {
			return apiErr(http.StatusConflict, CodeNotRegistered, "The "+sub.kind()+" has no registered attestation key.")
		}
		if err != nil {
			return err
		}
		return fromAgent(r, a)
	})
	if err != nil {
		return err
	}
	var req api.EvidenceRequest
	if err := decodeUpTo(w, r, &req, maxEvidenceBody); err != nil {
		return err
	}
	var view api.Attestation
	err = s.updateAttestation(r.Context(), sub, "", func(a *store.Attestation) error { return judgeEvidence(r, a, &req) }, &view)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, view)
	return nil
}

// judgeEvidence verifies req for the subject of a and records the verdict
// on a, with what the verifier keeps for the next evidence.
func judgeEvidence(r *http.Request, a *store.Attestation, req *api.EvidenceRequest) error {
	if a.RegisteredAt.IsZero() {
		return apiErr(http.StatusConflict, CodeNotRegistered, "The instance has no registered attestation key.")
	}
	if err := fromAgent(r, a); err != nil {
		return err // before the nonce is spent: a stranger cannot spend it
	}
	if fresh := a.Nonce != nil && bytes.Equal(a.Nonce, req.Nonce) && time.Now().Before(a.NonceExpires); !fresh {
		a.Nonce = nil
		return keep{apiErr(http.StatusConflict, CodeStaleNonce, "The evidence does not answer the current nonce (used, expired or never issued); ask for a new one.")}
	}
	// Evidence refused from here to the nonce's spending may come again
	// with the same quote.
	if len(req.EventLog) == 0 {
		// Nothing to replay the quote against: not evidence to judge.
		return apiErr(http.StatusBadRequest, CodeNoEventLog, "The evidence has no firmware event log (event_log); send the one the kernel exposes with the quote. The nonce is still good.")
	}
	switch {
	case req.IMAOffset < 0:
		return apiErr(http.StatusBadRequest, CodeInvalidParameter, "ima_offset is the number of IMA entries the log continues from, 0 or more.")
	case req.IMAOffset > 0 && req.IMAOffset != a.IMAEntries:
		return apiErr(http.StatusConflict, CodeFullIMALogRequired, fmt.Sprintf(
			"The IMA log continues from entry %d, but the verifier holds %d entries of it: send the whole log (ima_offset 0), or the entries from %d on. The nonce is still good.",
			req.IMAOffset, a.IMAEntries, a.IMAEntries))
	}
	a.Nonce = nil
	ak, err := attest.ParseAK(a.AKPublic)
	if err != nil {
		return err
	}
	prev := attest.State{EventLog: a.EventLog}
	if a.PCRs != nil {
		prev.Quote = &attest.Quote{Clock: a.Clock, ResetCount: a.ResetCount, RestartCount: a.RestartCount, PCRs: a.PCRs}
	}
	if req.IMAOffset > 0 {
		if prev.IMA, prev.IMALog, err = attest.ParseIMAPrefix(a.IMALog, a.IMAEntries); err != nil {
			return fmt.Errorf("the IMA log kept for %s: %w", a.InstanceID, err)
		}
	}
	verdict, next := attest.Verify(ak, attest.Evidence{Attest: req.Attest, Signature: req.Signature, PCRs: req.PCRs,
		EventLog: req.EventLog, IMALog: req.IMALog, IMAOffset: req.IMAOffset}, req.Nonce, prev, storedPolicy(a))
	record(a, verdict)
	if verdict.Genuine {
		a.EvidenceAt = time.Now().UTC()
		q := next.Quote
		a.Clock, a.ResetCount, a.RestartCount, a.PCRs, a.EventLog = q.Clock, q.ResetCount, q.RestartCount, q.PCRs, next.EventLog
		a.IMALog, a.IMAEntries = next.IMALog, len(next.IMA)
	}
	return nil
}

// record puts a verdict on a.
func record(a *store.Attestation, v attest.Verdict) {
	a.Reasons, a.VerifiedAt = v.Reasons, time.Now().UTC()
	switch {
	case v.Trusted:
		a.Verdict = "trusted"
	case v.Genuine && storedPolicy(a) == nil:
		a.Verdict = "pending"
	default:
		a.Verdict = "untrusted"
	}
}

// storedPolicy is the policy kept with a; nil when there is none.
func storedPolicy(a *store.Attestation) *attest.Policy {
	if len(a.PolicyPCRs) == 0 && len(a.PolicyDigests) == 0 {
		return nil
	}
	return &attest.Policy{PCRs: a.PolicyPCRs, Digests: a.PolicyDigests, EventLog: a.PolicyEventLog}
}

// lastBoot is what a's last accepted evidence showed.
func lastBoot(a *store.Attestation) (attest.Boot, error) {
	b := attest.Boot{PCRs: a.PCRs}
	var err error
	if b.Events, err = attest.ParseEventLog(a.EventLog); err != nil {
		return b, err
	}
	if a.IMAEntries > 0 {
		if b.IMA, err = attest.ParseIMALog(a.IMALog); err != nil {
			return b, err
		}
		b.IMA = b.IMA[:min(a.IMAEntries, len(b.IMA))]
	}
	return b, nil
}

// setPolicy gives the subject a policy, learned from its last accepted
// evidence or copied from a named one, and judges that evidence by it.
func (s *Server) setPolicy(w http.ResponseWriter, r *http.Request) error {
	var req api.PolicyRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	var named *store.Policy
	action := "policy learned"
	switch {
	case req.Learn == (req.Policy != ""):
		return apiErr(http.StatusBadRequest, CodeInvalidParameter, "Set either \"learn\": true, to learn from the last accepted evidence, or \"policy\": NAME.")
	case req.Policy != "":
		owner := "" // a host takes the operator's policies
		if sub.vtpm != nil {
			owner = sub.vtpm.Project
		}
		if err := s.Store.View(r.Context(), func(tx *store.Tx) (err error) { named, err = findPolicy(tx, owner, req.Policy); return err }); err != nil {
			return err
		}
		action = "policy " + named.Name + " applied"
	}
	var view api.Attestation
	err = s.updateAttestation(r.Context(), sub, action, func(a *store.Attestation) error {
		var p attest.Policy
		if named != nil {
			p, a.PolicyName = attest.Policy{PCRs: named.PCRs, Digests: named.Digests, EventLog: named.EventLog}, named.Name
		} else {
			learned, err := learn(a, req.PCRs, req.Digests)
			if err != nil {
				return err
			}
			p, a.PolicyName = learned, ""
		}
		a.PolicyPCRs, a.PolicyDigests, a.PolicyEventLog = p.PCRs, p.Digests, p.EventLog
		if a.PCRs == nil {
			return nil // judged when evidence comes
		}
		b, err := lastBoot(a)
		if err != nil {
			return err
		}
		record(a, attest.Judge(p, b))
		return nil
	}, &view)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, view)
	return nil
}

// history is the subject's attestation events, oldest first:
// registrations, policies, and each change of its verdict and its host's.
func (s *Server) history(w http.ResponseWriter, r *http.Request) error {
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	incarnation := "" // a host's
	if sub.vtpm != nil {
		incarnation = sub.vtpm.Incarnation // this vTPM's, not an earlier one's of the instance id
	}
	var evs []store.Event
	if err := s.Store.View(r.Context(), func(tx *store.Tx) (err error) { evs, err = tx.ListEvents(sub.key, incarnation); return err }); err != nil {
		return err
	}
	out := api.EventList{Items: []api.Event{}}
	for _, e := range evs {
		if strings.HasPrefix(e.Action, "attestation ") || strings.HasPrefix(e.Action, "host attestation ") || strings.HasPrefix(e.Action, "policy ") {
			out.Items = append(out.Items, api.Event{At: e.At, Actor: e.Actor, Action: e.Action, Detail: e.Detail})
		}
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) getAttestation(w http.ResponseWriter, r *http.Request) error {
	_, view, err := s.readAttestation(r)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, view)
	return nil
}

// readAttestation reads the status of the instance or host the request
// names; 404 if it never registered.
func (s *Server) readAttestation(r *http.Request) (sub subject, view api.Attestation, err error) {
	if sub, err = s.subject(r); err != nil {
		return sub, view, err
	}
	err = s.Store.View(r.Context(), func(tx *store.Tx) error {
		a, err := tx.GetAttestation(sub.key)
		if errors.Is(err, store.ErrNotFound) {
			return apiErr(http.StatusNotFound, CodeNotRegistered, "The "+sub.kind()+" has never registered an attestation key.")
		}
		if err != nil {
			return err
		}
		view, err = s.attestation(tx, sub, a, time.Now())
		return err
	})
	return sub, view, err
}

// tokenLifetime bounds how long a relying party may rely on a signed verdict.
const tokenLifetime = 5 * time.Minute

// token is an instance's attestation status as a signed JWT (ES256) that a
// relying party checks offline against GET /.well-known/vtpmd/jwks.json.
func (s *Server) token(w http.ResponseWriter, r *http.Request) error {
	if s.Verdicts == nil {
		return apiErr(http.StatusConflict, CodeNotSupported, "This server does not sign verdicts.")
	}
	sub, view, err := s.readAttestation(r)
	if err != nil {
		return err
	}
	tok, err := s.Verdicts.Sign(verdictClaims(sub.vtpm, view, time.Now()))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.VerdictToken{Token: tok})
	return nil
}

// verdictClaims are an instance's verdict as tokens and webhooks carry
// them: overall is the answer to rely on.
func verdictClaims(v *store.VTPM, view api.Attestation, now time.Time) map[string]any {
	c := map[string]any{
		"iss": attest.TokenIssuer, "sub": v.InstanceID, "iat": now.Unix(), "exp": now.Add(tokenLifetime).Unix(),
		"project": v.Project, "host": v.Host, "verdict": view.Verdict, "reasons": view.Reasons,
		"verified_at": view.VerifiedAt, "policy_pcrs": view.PolicyPCRs,
		"overall": view.Overall, "summary": view.Summary,
	}
	if view.Host != nil {
		c["host_verdict"] = view.Host.Verdict
	}
	if view.Provisioning != nil {
		c["provisioning_verified"] = view.Provisioning.Verified
	}
	return c
}

func (s *Server) jwks(w http.ResponseWriter, r *http.Request) error {
	if s.Verdicts == nil {
		return apiErr(http.StatusNotFound, CodeNotFound, "This server does not sign verdicts.")
	}
	w.Header().Set("Content-Type", "application/json")
	_, err := w.Write(s.Verdicts.JWKS())
	return err
}

// keep is a refusal after which the attestation record is written all
// the same, because fn changed what must last (a spent nonce).
type keep struct{ error }

func (k keep) Unwrap() error { return k.error }

// updateAttestation applies fn to the subject's attestation record (a new
// one if none) in one transaction, with an event when action is set, and
// puts the resulting status in view (when not nil). When fn refuses, the
// record is left as it was, unless the refusal is a keep (a spent nonce
// stays spent); fn's error is returned after. So a refused caller, a
// stranger without the agent's token above all, writes nothing. A verdict change is an event and a webhook (queued in the
// outbox in the same transaction), for a host on every instance it runs.
func (s *Server) updateAttestation(ctx context.Context, sub subject, action string, fn func(*store.Attestation) error, view *api.Attestation) error {
	var refusal error
	err := s.updateNotifying(ctx, func(tx *store.Tx) ([]map[string]any, error) {
		if err := sameVTPM(tx, sub); err != nil {
			return nil, err
		}
		a, err := tx.GetAttestation(sub.key)
		existed := err == nil
		if errors.Is(err, store.ErrNotFound) {
			a, err = &store.Attestation{InstanceID: sub.key, Verdict: "pending"}, nil
		}
		if err != nil {
			return nil, err
		}
		before := a.Verdict
		if refusal = fn(a); refusal != nil {
			if k := (keep{}); !errors.As(refusal, &k) || !existed {
				return nil, nil // nothing to keep: write nothing
			}
		}
		a.StaleAt = s.staleAt(a)
		if err := tx.PutAttestation(a); err != nil {
			return nil, err
		}
		if refusal != nil {
			return nil, nil
		}
		changed := a.Verdict != before
		var status api.Attestation
		if view != nil || (changed && sub.vtpm != nil) {
			if status, err = s.attestation(tx, sub, a, time.Now()); err != nil {
				return nil, err
			}
			if view != nil {
				*view = status
			}
		}
		acts := []string{action}
		if changed {
			acts = append(acts, "attestation "+a.Verdict)
		}
		for _, act := range acts {
			if act == "" {
				continue
			}
			who := sub.actor
			if who == "" {
				who = byVTPMD
			}
			if err := tx.AppendEvent(store.Event{Actor: who, InstanceID: sub.key, Action: act, Detail: detail(a)}); err != nil {
				return nil, err
			}
		}
		switch {
		case !changed:
			return nil, nil
		case sub.vtpm != nil:
			return []map[string]any{verdictClaims(sub.vtpm, status, time.Now())}, nil
		}
		return s.hostVerdictNotes(tx, sub.host, a)
	})
	if err != nil {
		return err
	}
	return refusal
}

// sameVTPM refuses a change to the attestation of a vTPM that was deleted
// since the request read it: its instance id may have another vTPM now,
// maybe another project's, whose attestation it is not.
func sameVTPM(tx *store.Tx, sub subject) error {
	if sub.vtpm == nil {
		return nil
	}
	v, err := tx.GetVTPM(sub.key)
	if err == nil && v.Incarnation != sub.vtpm.Incarnation {
		err = fmt.Errorf("vtpm %s of incarnation %s: %w", sub.key, sub.vtpm.Incarnation, store.ErrNotFound)
	}
	return err
}

// updateNotifying runs fn in one transaction; the verdict changes it
// returns are queued for the webhook in that same transaction, and the
// deliverer woken once it commits.
func (s *Server) updateNotifying(ctx context.Context, fn func(tx *store.Tx) ([]map[string]any, error)) error {
	var notified bool
	err := s.Store.Update(ctx, func(tx *store.Tx) error {
		notes, err := fn(tx)
		if err != nil {
			return err
		}
		for _, n := range notes {
			if err := s.Webhook.enqueue(tx, n); err != nil {
				return err
			}
		}
		notified = len(notes) > 0
		return nil
	})
	if err == nil && notified {
		s.Webhook.wake()
	}
	return err
}

// forgetHost drops a host's attestation record (the TPM it is pinned to,
// its AK, policy and verdict) so that a replaced TPM can register. Until
// one does, its instances read their host as unattested.
func (s *Server) forgetHost(w http.ResponseWriter, r *http.Request) error {
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	const why = "the host's TPM registration was removed"
	err = s.updateNotifying(r.Context(), func(tx *store.Tx) ([]map[string]any, error) {
		if _, err := tx.GetAttestation(sub.key); errors.Is(err, store.ErrNotFound) {
			return nil, apiErr(http.StatusNotFound, CodeNotRegistered, "The host has never registered an attestation key.")
		} else if err != nil {
			return nil, err
		}
		if err := tx.DeleteAttestation(sub.key); err != nil {
			return nil, err
		}
		if err := tx.AppendEvent(store.Event{Actor: sub.actor, InstanceID: sub.key, Action: "attestation forgotten", Detail: why}); err != nil {
			return nil, err
		}
		return s.hostVerdictNotes(tx, sub.host, &store.Attestation{Verdict: "unattested", Reasons: []string{why}})
	})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// hostVerdictNotes are the webhook payloads of a change of host's verdict
// (a): one for each registered instance on it, whose overall answer
// changes with it, each also an event.
func (s *Server) hostVerdictNotes(tx *store.Tx, host string, a *store.Attestation) ([]map[string]any, error) {
	now := time.Now()
	vs, err := tx.ListVTPMs(store.Filter{Host: host})
	if err != nil {
		return nil, err
	}
	var notes []map[string]any
	for _, v := range vs {
		va, err := tx.GetAttestation(v.InstanceID)
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		view, err := s.attestation(tx, subject{key: v.InstanceID, vtpm: v}, va, now)
		if err != nil {
			return nil, err
		}
		if err := tx.AppendEvent(store.Event{Actor: byVTPMD, InstanceID: v.InstanceID, Action: "host attestation " + a.Verdict, Detail: detail(a)}); err != nil {
			return nil, err
		}
		notes = append(notes, verdictClaims(v, view, now))
	}
	return notes, nil
}

func detail(a *store.Attestation) string {
	if len(a.Reasons) > 0 {
		return a.Reasons[0]
	}
	return a.Verdict
}

// staleAt is when a's verdict turns stale without new evidence: a
// registered subject must send genuine evidence within StaleAfter of its
// last (or of registering).
func (s *Server) staleAt(a *store.Attestation) time.Time {
	if a.RegisteredAt.IsZero() || a.Verdict == "stale" {
		return time.Time{}
	}
	return lastSeen(a).Add(s.staleAfter())
}

func (s *Server) staleAfter() time.Duration {
	if s.StaleAfter <= 0 {
		return DefaultStaleAfter
	}
	return s.StaleAfter
}

// lastSeen is when a's subject last sent genuine evidence, or registered.
func lastSeen(a *store.Attestation) time.Time {
	if a.EvidenceAt.After(a.RegisteredAt) {
		return a.EvidenceAt
	}
	return a.RegisteredAt
}

// goStale turns a's verdict stale if its evidence is overdue at now.
func goStale(a *store.Attestation, now time.Time) {
	if a.StaleAt.IsZero() || now.Before(a.StaleAt) {
		return
	}
	a.Reasons = []string{fmt.Sprintf("no evidence since %s (the last verdict was %s)", lastSeen(a).Format(time.RFC3339), a.Verdict)}
	a.Verdict, a.StaleAt = "stale", time.Time{}
}

// MarkStale turns the verdict of every subject whose evidence is overdue
// into "stale", which like any verdict change is an event and a webhook.
func (s *Server) MarkStale(ctx context.Context) error {
	var keys []string
	err := s.Store.View(ctx, func(tx *store.Tx) (err error) { keys, err = tx.OverdueAttestations(time.Now()); return err })
	if err != nil {
		return err
	}
	for _, key := range keys {
		sub := subject{key: key}
		if host, ok := strings.CutPrefix(key, store.HostKey("")); ok {
			sub.host = host
		} else if err := s.Store.View(ctx, func(tx *store.Tx) (err error) { sub.vtpm, err = tx.GetVTPM(key); return err }); err != nil {
			return err
		}
		err := s.updateAttestation(ctx, sub, "", func(a *store.Attestation) error { goStale(a, time.Now()); return nil }, nil)
		if err != nil {
			return err
		}
	}
	return nil
}

// WatchStale runs MarkStale until ctx ends, often enough that a verdict
// turns stale within a tenth of StaleAfter of its deadline.
func (s *Server) WatchStale(ctx context.Context) {
	t := time.NewTicker(s.staleAfter() / 10)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := s.MarkStale(ctx); err != nil && ctx.Err() == nil {
				s.Log.Error("marking overdue attestations stale", "err", err)
			}
		}
	}
}

// attestationView is the status as of now: a verdict whose evidence is
// overdue reads "stale" even before MarkStale records it.
func attestationView(a *store.Attestation, now time.Time) api.Attestation {
	if !a.StaleAt.IsZero() && !now.Before(a.StaleAt) {
		c := *a
		goStale(&c, now)
		a = &c
	}
	out := api.Attestation{InstanceID: a.InstanceID, State: "unregistered", RegisteredAt: a.RegisteredAt, Verdict: a.Verdict,
		Reasons: a.Reasons, VerifiedAt: a.VerifiedAt, PCRs: a.PCRs, Policy: a.PolicyName, IMAEntries: a.IMAEntries}
	switch {
	case !a.RegisteredAt.IsZero():
		out.State = "registered"
	case a.ChallengeHash != nil:
		out.State = "challenged"
	}
	for i := range a.PolicyPCRs {
		out.PolicyPCRs = append(out.PolicyPCRs, i)
	}
	for i := range a.PolicyDigests {
		out.PolicyPCRs = append(out.PolicyPCRs, i)
	}
	slices.Sort(out.PolicyPCRs)
	out.PolicyPCRs = slices.Compact(out.PolicyPCRs)
	return out
}

// attestation is sub's attestation status as of now. An instance's carries its
// host's verdict, its provisioning record and the overall answer.
func (s *Server) attestation(tx *store.Tx, sub subject, a *store.Attestation, now time.Time) (api.Attestation, error) {
	out := attestationView(a, now)
	v := sub.vtpm
	if v == nil {
		out.InstanceID, out.HostName = "", sub.host
		return out, nil
	}
	host := api.HostVerdict{Name: v.Host, Verdict: "unattested"}
	ha, err := tx.GetAttestation(store.HostKey(v.Host))
	switch {
	case err == nil:
		if hv := attestationView(ha, now); hv.State == "registered" {
			host.Verdict, host.Reasons, host.VerifiedAt = hv.Verdict, hv.Reasons, hv.VerifiedAt
		}
	case !errors.Is(err, store.ErrNotFound):
		return out, err
	}
	p := s.provisioning(v)
	out.Host, out.Provisioning = &host, &p
	out.Overall, out.Summary = overall(out.Verdict, out.Reasons, host, p)
	return out, nil
}

// provisioning is v's provisioning record: the host vtpmd placed it on
// and its EK certificates, checked against the deployment CA and against
// the EKs recorded when vtpmd made the TPM.
func (s *Server) provisioning(v *store.VTPM) api.Provisioning {
	p := api.Provisioning{Host: v.Host, Verified: len(v.EKs) > 0}
	if len(v.EKs) == 0 {
		p.Reason = "the vTPM has no endorsement key yet"
	}
	for _, ek := range v.EKs {
		c := s.checkEK(ek)
		if c.cert != nil {
			p.EKCertificates = append(p.EKCertificates, *c.cert)
		}
		if c.failure != "" && p.Verified {
			p.Verified, p.Reason = false, c.failure
		}
	}
	return p
}

// ekCheck is the outcome of checking one EK certificate.
type ekCheck struct {
	cert    *api.EKCertificate // nil if unreadable
	failure string
}

// checkEK checks ek's certificate against the deployment CA and the EK.
// Neither changes, so the outcome is kept: a status read, or evidence on
// the verifier's path, costs no signature check.
func (s *Server) checkEK(ek store.EK) ekCheck {
	key := sha256.Sum256(append(bytes.Clone(ek.CertDER), ek.PublicDER...))
	if c, ok := s.ekChecks.Load(key); ok {
		return c.(ekCheck)
	}
	var c ekCheck
	cert, err := x509.ParseCertificate(ek.CertDER)
	if err != nil {
		c.failure = fmt.Sprintf("the %s EK has no readable certificate", ek.Kind)
	} else {
		c.cert = &api.EKCertificate{Kind: ek.Kind, Issuer: cert.Issuer.String(), Serial: cert.SerialNumber.Text(16), NotBefore: cert.NotBefore}
		pub, err := attest.VerifyEKCertificate(ek.CertDER, s.deploymentCA())
		if err != nil {
			c.failure = err.Error()
		} else if der, err := x509.MarshalPKIXPublicKey(pub); err != nil || !bytes.Equal(der, ek.PublicDER) {
			c.failure = fmt.Sprintf("the %s EK certificate certifies another key than the EK vtpmd made", ek.Kind)
		}
	}
	s.ekChecks.Store(key, c)
	return c
}

// deploymentCA is the pool of the deployment CA chain, read once.
func (s *Server) deploymentCA() *x509.CertPool {
	s.caOnce.Do(func() {
		if s.CAChainPEM == nil {
			return
		}
		s.caPool = x509.NewCertPool()
		s.caPool.AppendCertsFromPEM(s.CAChainPEM())
	})
	return s.caPool
}

// overall is the tenant's one answer about an instance: its own verdict
// first, then its vTPM's provenance, then its host's verdict.
func overall(verdict string, reasons []string, host api.HostVerdict, p api.Provisioning) (string, string) {
	first := func(rs []string) string {
		if len(rs) == 0 {
			return ""
		}
		return ": " + rs[0]
	}
	switch {
	case verdict != "trusted":
		return verdict, "the VM is " + verdict + first(reasons)
	case !p.Verified:
		return "untrusted", "VM trusted, but its vTPM is not one vtpmd provisioned: " + p.Reason
	case host.Verdict == "trusted":
		return "trusted", "VM trusted on trusted host " + host.Name
	case host.Verdict == "unattested":
		return "untrusted", "VM trusted, but host " + host.Name + " does not attest: its integrity is unknown"
	default:
		return host.Verdict, "VM trusted, but host " + host.Name + " is " + host.Verdict + first(host.Reasons)
	}
}
