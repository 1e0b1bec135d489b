package verifier

import (
	"fmt"
	"time"

	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// The key broker (internal/broker) releases a secret to an instance by
// the instance's attestation as of the release (Gate), and the verifier,
// where verdicts change, revokes the releases when the instance's overall
// answer stops being trusted (revokeReleases).

// Gate is an instance's attestation as the key broker judges a release:
// its vTPM, its status now, how fresh its and its host's evidence is, and
// the EK and AK its registered agent proved.
type Gate struct {
	// VTPM is the instance's vTPM as of the release's transaction.
	VTPM   *store.VTPM
	Status Status
	// EvidenceAt and HostEvidenceAt are when the instance's and its host's
	// last genuine evidence arrived (zero for a host that never attested).
	EvidenceAt, HostEvidenceAt time.Time
	// EK is the registered EK (of the kind the agent registered with);
	// AKPublic the registered AK (TPM2B_PUBLIC).
	EK       store.EK
	AKPublic []byte
	// PolicyID is the identity of the named policy the instance is judged
	// by ("" for a learned one or none).
	PolicyID string
}

// Gate reads, in tx, the attestation of instance id (canonical) as a
// release needs it, for the agent that sent agentToken, as of tx: the
// instance's vTPM (not found if it has none, or one of a project c does
// not see), its registration (not_registered), the agent's token
// (unauthenticated), its status, and its and its host's evidence times.
// It reads no event log.
func (v *Verifier) Gate(tx *store.Tx, c tenant.Caller, id, agentToken string) (*Gate, error) {
	vt, a, host, err := tx.GetVTPMAttested(id)
	if err == nil && !c.Sees(vt.Project) {
		err = fmt.Errorf("vtpm %s: %w", id, store.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	sub := Subject{key: vt.InstanceID, vtpm: vt, actor: c.Actor}
	if a == nil || a.RegisteredAt.IsZero() {
		return nil, notRegistered(sub)
	}
	if err := fromAgent(agentToken, a); err != nil {
		return nil, err
	}
	now := v.now()
	st := v.statusWith(sub, a, hostVerdictOf(vt.Host, host, now), now)
	g := &Gate{VTPM: vt, Status: st, EvidenceAt: a.EvidenceAt, HostEvidenceAt: st.Host.EvidenceAt, AKPublic: a.AKPublic, PolicyID: a.PolicyID}
	kind := a.EKKind
	if kind == "" {
		kind = "rsa2048"
	}
	for _, ek := range vt.EKs {
		if ek.Kind == kind {
			g.EK = ek
		}
	}
	if g.EK.PublicDER == nil {
		return nil, notRegistered(sub)
	}
	return g, nil
}

// revokeReleases revokes the secrets released to vt's instance when its
// overall answer st is not trusted: each revocation is an event, the
// agent's long poll is woken (a request for fresh evidence; the poll's
// answer names the secrets), and note, the webhook of the change, names
// them (secrets_revoked).
func (v *Verifier) revokeReleases(tx *store.Tx, vt *store.VTPM, st Status, note map[string]any) error {
	if st.Overall == store.VerdictTrusted {
		return nil
	}
	revoked, err := tx.RevokeReleases(vt.InstanceID, st.Summary)
	if err != nil || len(revoked) == 0 {
		return err
	}
	var names []string
	for _, r := range revoked {
		names = append(names, r.Name)
		if err := tx.AppendEvent(store.Event{Actor: byVTPMD, InstanceID: vt.InstanceID, Action: "secret revoked", Detail: r.Name + ": " + st.Summary}); err != nil {
			return err
		}
	}
	note["secrets_revoked"] = names
	return tx.AskRefresh(vt.InstanceID, v.now())
}
