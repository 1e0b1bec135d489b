package verifier

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/bearer"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
)

// Register checks the AK and answers with a credential only the TPM of the
// registered EK can open, and only for this AK, with the ticket that says
// what it registers (see ticket). An instance's EK must be the one vtpmd
// made for it; a host's, one its certificate vouches for, and the one it
// registered with before. Nothing is written: the record changes only when
// the TPM proves the registration (Activate).
func (v *Verifier) Register(ctx context.Context, sub Subject, req api.RegisterRequest) (api.CredentialChallenge, error) {
	var ch api.CredentialChallenge
	var ekDER []byte
	if sub.vtpm != nil {
		ek, err := instanceEK(sub.vtpm, &req)
		if err != nil {
			return ch, err
		}
		ekDER, ch.EKHandle = ek.PublicDER, fmt.Sprintf("0x%08x", ek.Handle)
	} else {
		var err error
		if ekDER, err = v.hostEK(&req); err != nil {
			return ch, err
		}
		if err := v.sameHostTPM(ctx, sub, ekDER); err != nil {
			return ch, err
		}
	}
	ak, err := attest.ParseAK(req.AKPublic)
	if err != nil {
		return ch, refusal.Invalid(api.CodeInvalidAK, err.Error())
	}
	ekPub, err := x509.ParsePKIXPublicKey(ekDER)
	if err != nil {
		return ch, err
	}
	now := v.now()
	t := ticket{Subject: sub.key, IssuedAt: now, Expires: now.Add(ticketLifetime), EKKind: req.EKKind, EK: ekDER, AK: req.AKPublic}
	raw, secret, err := t.issue(v.cfg.TicketKey)
	if err != nil {
		return ch, err
	}
	c, err := attest.NewChallenge(ekPub, ak, secret)
	if err != nil {
		return ch, err
	}
	ch.CredentialBlob, ch.EncryptedSeed, ch.Ticket = c.CredentialBlob, c.EncryptedSeed, raw
	return ch, nil
}

// sameHostTPM refuses a host's registration with another TPM than the one
// it registered with (vtpmctl host forget first, after replacing it).
func (v *Verifier) sameHostTPM(ctx context.Context, sub Subject, ekDER []byte) error {
	return v.cfg.Store.View(ctx, func(tx *store.Tx) error {
		a, err := tx.GetAttestationWithoutLogs(sub.key)
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		if err == nil && a.EKPublic != nil && !bytes.Equal(a.EKPublic, ekDER) {
			return otherHostTPM(sub)
		}
		return err
	})
}

func otherHostTPM(sub Subject) error {
	return refusal.Forbidden(api.CodeEKMismatch, "Host "+sub.host+" registered with another TPM; registration refused.")
}

// instanceEK is the EK vtpmd made for vt that the registration asks for:
// of the kind req names, else of the kind of the EK it sends (its key
// says which), else the RSA one. It sets req.EKKind to that kind.
func instanceEK(vt *store.VTPM, req *api.RegisterRequest) (*store.EK, error) {
	if req.EKKind != "" && req.EKKind != attest.EKKindRSA2048 && req.EKKind != attest.EKKindECCP256 {
		return nil, refusal.Invalid(api.CodeInvalidParameter, "ek_kind is "+attest.EKKindRSA2048+" or "+attest.EKKindECCP256+", the EKs vtpmd makes.")
	}
	if req.EKPublic != nil {
		pub, err := x509.ParsePKIXPublicKey(req.EKPublic)
		if err != nil {
			return nil, refusal.Invalid(api.CodeInvalidParameter, "ek_public is not a PKIX public key: "+err.Error())
		}
		kind, err := attest.EKKind(pub)
		switch {
		case err != nil:
			return nil, refusal.Invalid(api.CodeInvalidParameter, "ek_public is no EK vtpmd makes: "+err.Error())
		case req.EKKind == "":
			req.EKKind = kind
		case req.EKKind != kind:
			return nil, refusal.Invalid(api.CodeInvalidParameter, "ek_kind is "+req.EKKind+", but ek_public is an "+kind+" key.")
		}
	}
	if req.EKKind == "" {
		req.EKKind = attest.EKKindRSA2048
	}
	for i := range vt.EKs {
		if vt.EKs[i].Kind != req.EKKind {
			continue
		}
		if req.EKPublic != nil && !bytes.Equal(req.EKPublic, vt.EKs[i].PublicDER) {
			return nil, refusal.Forbidden(api.CodeEKMismatch, "This "+req.EKKind+" EK is not the one vtpmd made for instance "+vt.InstanceID+"; registration refused.")
		}
		return &vt.EKs[i], nil
	}
	return nil, refusal.Conflict(api.CodeNotReady, "The vTPM has no "+req.EKKind+" EK (phase "+string(vt.Phase)+").")
}

// hostEK is the EK a host's TPM registers with: the one its certificate,
// which must chain to the configured host EK CA, certifies.
func (v *Verifier) hostEK(req *api.RegisterRequest) ([]byte, error) {
	if req.EKCertificate == nil {
		return nil, refusal.Invalid(api.CodeInvalidParameter, "A host registers with its TPM's EK certificate (ek_certificate).")
	}
	pub, err := attest.VerifyEKCertificate(req.EKCertificate, v.cfg.HostEKRoots)
	if err != nil {
		return nil, refusal.Forbidden(api.CodeEKUntrusted, "The host's EK certificate is not vouched for by a configured CA: "+err.Error())
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	if req.EKPublic != nil && !bytes.Equal(req.EKPublic, der) {
		return nil, refusal.Forbidden(api.CodeEKMismatch, "The EK is not the one the EK certificate certifies; registration refused.")
	}
	return der, nil
}

// Activate completes a registration when the TPM gave the credential back:
// the ticket's AK becomes the registered one, and its agent gets a bearer
// token, returned here and kept only as a hash. The TPM's counters are
// kept, so registering again cannot hide a rollback. A ticket serves once:
// a registration newer than the ticket refuses it.
func (v *Verifier) Activate(ctx context.Context, sub Subject, req api.ActivateRequest) (st Status, agentToken string, err error) {
	t, err := redeem(v.cfg.TicketKey, req.Ticket, req.Secret, sub.key, v.now())
	if err != nil {
		return st, "", err
	}
	token, tokenHash, err := bearer.New()
	if err != nil {
		return st, "", err
	}
	err = v.update(ctx, sub, "attestation key registered", func(a *store.Attestation) error {
		if !a.RegisteredAt.Before(t.IssuedAt) {
			return refusal.Conflict(api.CodeNotRegistered, "This registration was activated already, or a newer one was; register again.")
		}
		if sub.host != "" && a.EKPublic != nil && !bytes.Equal(a.EKPublic, t.EK) {
			return otherHostTPM(sub)
		}
		a.AKPublic, a.EKKind, a.AgentTokenHash, a.RegisteredAt = t.AK, t.EKKind, tokenHash, v.now()
		if sub.host != "" {
			a.EKPublic = t.EK
		}
		a.Nonce = nil
		a.Verdict, a.Reasons = store.VerdictPending, []string{"registered; waiting for evidence"}
		return nil
	}, &st)
	if err != nil {
		return st, "", err
	}
	return st, token, nil
}
