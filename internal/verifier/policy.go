package verifier

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// A subject's policy is its own copy: learned from its last accepted
// evidence, or copied from a named policy (a project's own, or the
// operator's shared ones), which may then change or go without touching
// it. Setting a policy judges the last accepted evidence by it at once.

// SetPolicy gives the subject a policy, learned from its last accepted
// evidence (req.Learn) or copied from the named one req.Policy (an
// instance's project's, else the operator's; a host takes the operator's),
// and judges that evidence by it. The status carries the judgement's
// mismatches.
func (v *Verifier) SetPolicy(ctx context.Context, sub Subject, req api.PolicyRequest) (Status, error) {
	var named *store.Policy
	action := "policy learned"
	switch {
	case req.Learn == (req.Policy != ""):
		return Status{}, refusal.Invalid(api.CodeInvalidParameter, "Set either \"learn\": true, to learn from the last accepted evidence, or \"policy\": NAME.")
	case req.Policy != "":
		owner := "" // a host takes the operator's policies
		if sub.vtpm != nil {
			owner = sub.vtpm.Project
		}
		if err := v.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { named, err = findPolicy(tx, owner, req.Policy); return err }); err != nil {
			return Status{}, err
		}
		action = "policy " + named.Name + " applied"
	}
	var st Status
	var judged attest.Verdict
	err := v.update(ctx, sub, action, func(a *store.Attestation) error {
		var p attest.Policy
		if named != nil {
			p, a.PolicyName, a.PolicyID = attest.Policy{PCRs: named.PCRs, Digests: named.Digests, EventLog: named.EventLog}, named.Name, named.ID
		} else {
			learned, err := learn(a, req.PCRs, req.Digests)
			if err != nil {
				return err
			}
			p, a.PolicyName, a.PolicyID = learned, "", ""
		}
		a.PolicyPCRs, a.PolicyDigests, a.PolicyEventLog = p.PCRs, p.Digests, p.EventLog
		if a.PCRs == nil {
			return nil // judged when evidence comes
		}
		b, err := lastBoot(a)
		if err != nil {
			return err
		}
		judged = attest.Judge(p, b)
		v.record(a, judged)
		return nil
	}, &st)
	st.Mismatches = judged.Mismatches
	return st, err
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

// Mismatches judges a's last accepted evidence again by the policy a
// holds, for a page that explains the verdict: the mismatches with their
// structure (the record keeps only their words, Reasons), such as the
// IMA entry a digest policy does not allow. None when a has no evidence
// or no policy. It parses a's whole IMA log: not for every read.
func Mismatches(a *store.Attestation) ([]attest.Mismatch, error) {
	p := storedPolicy(a)
	if a.PCRs == nil || p == nil {
		return nil, nil
	}
	b, err := lastBoot(a)
	if err != nil {
		return nil, err
	}
	return attest.Evaluate(*p, b), nil
}

// learn takes a's last accepted evidence as the reference boot for the
// given PCRs: their values (default: every PCR quoted but IMA's, which
// changes as the system runs), or the digests of what extended them
// (default: every PCR quoted).
func learn(a *store.Attestation, which []int, digests bool) (attest.Policy, error) {
	for _, i := range which {
		if err := checkPCR(i); err != nil {
			return attest.Policy{}, err
		}
	}
	if a.PCRs == nil {
		return attest.Policy{}, refusal.Conflict(api.CodeNoEvidence, "No evidence has been accepted yet to learn from.")
	}
	b, err := lastBoot(a)
	if err != nil {
		return attest.Policy{}, err
	}
	if which == nil {
		which = slices.DeleteFunc(slices.Sorted(maps.Keys(a.PCRs)), func(i int) bool { return i == attest.IMAPCR && !digests })
	}
	p := attest.Learn(b, a.EventLog, which)
	if digests {
		p = attest.LearnDigests(b, which)
	}
	if len(p.PCRs) == 0 && len(p.Digests) == 0 {
		return p, refusal.Invalid(api.CodeInvalidParameter, fmt.Sprintf("Nothing to learn: the last accepted evidence has nothing for PCRs %v.", which))
	}
	return p, nil
}

func checkPCR(i int) error {
	if i < 0 || i > 23 {
		return refusal.Invalid(api.CodeInvalidParameter, fmt.Sprintf("PCR %d does not exist (0–23).", i))
	}
	return nil
}

var policyNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// CreatePolicy makes a named policy of the project req names (or the
// caller's; the operator's without one are shared), from reference values
// or learned from the last accepted evidence of an instance or (the
// operator's) a host.
func (v *Verifier) CreatePolicy(ctx context.Context, c tenant.Caller, req api.CreatePolicyRequest) (*store.Policy, error) {
	if !policyNameRE.MatchString(req.Name) {
		return nil, refusal.Invalid(api.CodeInvalidParameter, "Policy name "+refusal.Quote(req.Name)+" is invalid: lower-case letters, digits, '.', '_' and '-', at most 63.")
	}
	project, err := c.Owner(req.Project, "policies", false)
	if err != nil {
		return nil, err
	}
	p := &store.Policy{Project: project, Name: req.Name}
	switch {
	case (len(req.PCRs) > 0 || len(req.Digests) > 0) == (req.LearnFrom != nil):
		return nil, refusal.Invalid(api.CodeInvalidParameter, "Give either reference values (\"pcrs\", \"digests\") or where to learn them (\"learn_from\").")
	case req.LearnFrom != nil:
		learned, from, err := v.learnFrom(ctx, c, req.LearnFrom)
		if err != nil {
			return nil, err
		}
		p.PCRs, p.Digests, p.EventLog, p.LearnedFrom = learned.PCRs, learned.Digests, learned.EventLog, from
	default:
		if p.PCRs, p.Digests, err = referenceValues(req.PCRs, req.Digests); err != nil {
			return nil, err
		}
	}
	err = v.cfg.Store.Update(ctx, func(tx *store.Tx) error { return tx.CreatePolicy(p) })
	if errors.Is(err, store.ErrExists) {
		return nil, refusal.Conflict(api.CodeAlreadyExists, "A policy named "+p.Name+" exists already; delete it first or choose another name.")
	}
	return p, err
}

// referenceValues checks hand-written reference values and allowed
// digests: SHA-256 digests, in hex, for existing PCRs.
func referenceValues(values map[int]string, digests map[int][]string) (map[int][]byte, map[int][][]byte, error) {
	sha256Hex := func(i int, h string) ([]byte, error) {
		if err := checkPCR(i); err != nil {
			return nil, err
		}
		v, err := hex.DecodeString(h)
		if err != nil || len(v) != 32 {
			return nil, refusal.Invalid(api.CodeInvalidParameter, fmt.Sprintf("PCR %d: %s is not a SHA-256 digest in hex (64 digits).", i, refusal.Quote(h)))
		}
		return v, nil
	}
	pcrs, allowed := map[int][]byte{}, map[int][][]byte{}
	for i, h := range values {
		v, err := sha256Hex(i, h)
		if err != nil {
			return nil, nil, err
		}
		pcrs[i] = v
	}
	for i, hs := range digests {
		if len(hs) == 0 {
			return nil, nil, refusal.Invalid(api.CodeInvalidParameter, fmt.Sprintf("PCR %d: an empty list of digests allows nothing.", i))
		}
		for _, h := range hs {
			v, err := sha256Hex(i, h)
			if err != nil {
				return nil, nil, err
			}
			allowed[i] = append(allowed[i], v)
		}
	}
	return pcrs, allowed, nil
}

// learnFrom learns a policy from the instance or host named by from, as
// the caller may see it.
func (v *Verifier) learnFrom(ctx context.Context, c tenant.Caller, from *api.LearnFrom) (attest.Policy, string, error) {
	key := from.InstanceID
	switch {
	case (from.InstanceID == "") == (from.Host == ""):
		return attest.Policy{}, "", refusal.Invalid(api.CodeInvalidParameter, "learn_from names either an instance (\"instance_id\") or a host (\"host\").")
	case from.Host != "" && c.Project != "":
		return attest.Policy{}, "", refusal.Forbidden(api.CodeForbidden, "A host's own attestation is for the operator.")
	case from.Host != "":
		key = store.HostKey(from.Host)
	}
	var a *store.Attestation
	err := v.cfg.Store.View(ctx, func(tx *store.Tx) error {
		if from.InstanceID != "" {
			vt, err := tx.GetVTPM(from.InstanceID)
			if err != nil {
				return err
			}
			if !c.Sees(vt.Project) {
				return store.ErrNotFound
			}
		}
		var err error
		a, err = tx.GetAttestation(key)
		return err
	})
	if errors.Is(err, store.ErrNotFound) {
		return attest.Policy{}, "", refusal.NotFound(api.CodeNotFound, "No attestation of "+key+" to learn from.")
	}
	if err != nil {
		return attest.Policy{}, "", err
	}
	p, err := learn(a, from.PCRs, from.Digests)
	return p, key, err
}

// Policies lists the named policies the caller sees: a project its own
// and the operator's shared ones, the operator every project's.
func (v *Verifier) Policies(ctx context.Context, c tenant.Caller) ([]*store.Policy, error) {
	var projects []string // the operator sees every project's
	if c.Project != "" {
		projects = []string{c.Project, ""}
	}
	var ps []*store.Policy
	err := v.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { ps, err = tx.ListPolicies(projects...); return err })
	return ps, err
}

// Policy reads the policy a project means by name: its own, else the
// operator's shared one. The project is the caller's or, for the operator,
// the one it asks for ("": its own).
func (v *Verifier) Policy(ctx context.Context, c tenant.Caller, asked, name string) (p *store.Policy, err error) {
	err = v.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { p, err = findPolicy(tx, policyProject(c, asked), name); return err })
	return p, err
}

// DeletePolicy removes the policy Policy would read; the subjects it was
// applied to keep their copies. A project cannot delete the operator's.
func (v *Verifier) DeletePolicy(ctx context.Context, c tenant.Caller, asked, name string) error {
	project := policyProject(c, asked)
	return v.cfg.Store.Update(ctx, func(tx *store.Tx) error {
		p, err := findPolicy(tx, project, name)
		if err != nil {
			return err
		}
		if p.Project != project {
			return refusal.Forbidden(api.CodeForbidden, "Policy "+p.Name+" is the operator's; a project cannot delete it.")
		}
		return tx.DeletePolicy(p.Project, p.Name)
	})
}

// policyProject is the project whose policies a request addresses.
func policyProject(c tenant.Caller, asked string) string {
	if c.Project == "" {
		return asked
	}
	return c.Project
}

// findPolicy is the policy a project means by name: its own, else the
// operator's shared one.
func findPolicy(tx *store.Tx, project, name string) (*store.Policy, error) {
	p, err := tx.GetPolicy(project, name)
	if errors.Is(err, store.ErrNotFound) && project != "" {
		p, err = tx.GetPolicy("", name)
	}
	if errors.Is(err, store.ErrNotFound) {
		return nil, refusal.NotFound(api.CodeNotFound, "No policy named "+refusal.Quote(name)+".")
	}
	return p, err
}
