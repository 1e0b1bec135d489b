// Package verifier is vtpmd's registrar and verifier: what attests (a
// subject: an instance's vTPM, or a host's own TPM) registers an
// attestation key by credential activation, then pushes quotes answering
// single-use nonces; each is judged (internal/attest) by the subject's
// policy, learned from its own evidence or copied from a named one, and
// the verdict recorded. A verdict change is an event and a webhook
// (internal/webhook, queued in the same transaction); a host's change is
// one for each instance on it, whose overall answer includes its host's.
// A subject that stops sending evidence turns stale (MarkStale), found by
// a sweep that one of the servers sharing the store runs (WatchStale).
//
// The verdict vocabulary is store.Verdict; a subject's status as of a
// moment is a Status. Refusals are *refusal.Error; time comes from
// Config.Now.
package verifier

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
	"github.com/vtpmd/vtpmd/internal/webhook"
)

// DefaultStaleAfter is how long a registered subject may go without
// genuine evidence before its verdict turns stale: guest agents attest
// every 30 s by default, so this is several missed rounds.
const DefaultStaleAfter = 3 * time.Minute

// VTPMs reads the vTPM of an instance as a caller may see it
// (vtpms.Service).
type VTPMs interface {
	Get(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error)
}

// Config is what a Verifier works with.
type Config struct {
	Store *store.Store
	VTPMs VTPMs
	// CAChainPEM is the deployment CA chain, which every EK certificate
	// of a vTPM vtpmd made chains to.
	CAChainPEM func() []byte
	// HostEKRoots are the CAs (TPM vendors' or the operator's) whose EK
	// certificates a host's own TPM may register with; nil: hosts cannot.
	HostEKRoots *x509.CertPool
	// Signer signs verdicts for relying parties; nil: none.
	Signer *attest.Signer
	// Webhook is told of every verdict change; nil: none.
	Webhook *webhook.Webhook
	// StaleAfter is how long a registered subject may go without genuine
	// evidence before its verdict turns stale; 0: DefaultStaleAfter.
	StaleAfter time.Duration
	// Replica names this server in the leases it holds (WatchStale);
	// default a random id.
	Replica string
	// Now is the clock; default time.Now.
	Now func() time.Time
	// TicketKey ties registrations' tickets to their credentials (see
	// ticket.go): every server replica of a deployment needs the same.
	// Default: a fresh key (NewTicketKey), this Verifier's alone.
	TicketKey []byte
	// Log (nil: silent) records failures of the stale sweep.
	Log *slog.Logger
}

// Verifier registers subjects and judges their evidence.
type Verifier struct {
	cfg  Config
	aks  akCache
	logs *attest.LogCache

	caOnce   sync.Once
	caPool   *x509.CertPool
	ekChecks sync.Map // [sha256.Size]byte → ekCheck; see checkEK
}

// New returns a Verifier with cfg.
func New(cfg Config) *Verifier {
	if cfg.StaleAfter <= 0 {
		cfg.StaleAfter = DefaultStaleAfter
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Replica == "" {
		cfg.Replica = uuid.NewString()
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.TicketKey == nil {
		cfg.TicketKey = NewTicketKey()
	}
	return &Verifier{cfg: cfg, aks: akCache{size: akCacheSize}, logs: attest.NewLogCache(logCacheBytes)}
}

// logCacheBytes bounds the parsed event logs a verifier keeps for
// evidence to come, shared by every subject: a ≈100-event firmware log
// of 12 KiB takes ≈26 KiB kept (the bytes, the events, the replay), so
// ≈2,500 distinct logs.
const logCacheBytes = 64 << 20

// LogCacheStats counts the lookups of the parsed event logs the verifier
// keeps (a hit spares parsing and replaying the evidence's log).
func (v *Verifier) LogCacheStats() attest.LogCacheStats { return v.logs.Stats() }

func (v *Verifier) now() time.Time { return v.cfg.Now().UTC() }

// Subject is what an attestation request is about: an instance's vTPM or
// a host's own TPM, and who asks.
type Subject struct {
	key   string // the attestation record's key
	vtpm  *store.VTPM
	host  string
	actor string // who asks, for the event log; "" for vtpmd itself
}

func (sub Subject) kind() string {
	if sub.vtpm != nil {
		return "instance"
	}
	return "host"
}

// byVTPMD names vtpmd itself in the event log, for what it changes on its
// own (a verdict turning stale, a host's verdict reaching its instances).
const byVTPMD = "vtpmd"

// Instance is the subject of the vTPM of instance id, as c may see it.
func (v *Verifier) Instance(ctx context.Context, c tenant.Caller, id string) (Subject, error) {
	vt, err := v.cfg.VTPMs.Get(ctx, c, id)
	if err != nil {
		return Subject{}, err
	}
	return Subject{key: vt.InstanceID, vtpm: vt, actor: c.Actor}, nil
}

// Host is the subject of host name's own TPM. A host's own attestation is
// the operator's business: a project sees it only through its instances'
// status.
func (v *Verifier) Host(ctx context.Context, c tenant.Caller, name string) (Subject, error) {
	if c.Project != "" {
		return Subject{}, refusal.Forbidden(api.CodeForbidden, "A host's own attestation is for the operator; a project sees it in its instances' attestation status.")
	}
	err := v.cfg.Store.View(ctx, func(tx *store.Tx) error { _, err := tx.GetHost(name); return err })
	if errors.Is(err, store.ErrNotFound) {
		return Subject{}, refusal.NotFound(api.CodeNotFound, "No such host.")
	}
	return Subject{key: store.HostKey(name), host: name, actor: c.Actor}, err
}

// State is where a subject's registration is.
type State string

const (
	Unregistered State = "unregistered"
	// Challenged: a registration waits for its credential (records of an
	// earlier vtpmd; registrations now keep nothing until activated).
	Challenged State = "challenged"
	Registered State = "registered"
)

// Status is a subject's attestation as of one moment.
type Status struct {
	// InstanceID names an instance's; HostName a host's own.
	InstanceID string
	HostName   string
	State      State
	// RegisteredAt is when the current attestation key was registered.
	RegisteredAt time.Time
	// Verdict on the subject's own evidence, and why.
	Verdict    store.Verdict
	Reasons    []string
	VerifiedAt time.Time
	// PolicyPCRs are the PCRs the policy judges; Policy names the named
	// policy it was copied from ("" when learned).
	PolicyPCRs []int
	Policy     string
	// PCRs and IMAEntries are what the last genuine evidence showed.
	PCRs       map[int][]byte
	IMAEntries int
	// Mismatches are the policy's reasons of a judgement just made
	// (Evidence, SetPolicy), structured; Reasons has them as text. Reads
	// have none.
	Mismatches []attest.Mismatch

	// For an instance: the verdict on the host it runs on, the record of
	// how its vTPM was provisioned, and the tenant's one answer (Overall,
	// with Summary saying why in words).
	Host         *HostVerdict
	Provisioning *api.Provisioning
	Overall      store.Verdict
	Summary      string
}

// HostVerdict is a host's attestation as an instance's status carries it.
// Its verdict is store.VerdictUnattested for a host whose TPM never
// registered.
type HostVerdict struct {
	Name       string
	Verdict    store.Verdict
	Reasons    []string
	VerifiedAt time.Time
	// EvidenceAt is when the host's last genuine evidence arrived.
	EvidenceAt time.Time
}

// Status reads the subject's attestation status; a subject that never
// registered is not found.
func (v *Verifier) Status(ctx context.Context, sub Subject) (Status, error) {
	var st Status
	err := v.cfg.Store.View(ctx, func(tx *store.Tx) error {
		a, err := tx.GetAttestationWithoutLogs(sub.key)
		if errors.Is(err, store.ErrNotFound) {
			return refusal.NotFound(api.CodeNotRegistered, "The "+sub.kind()+" has never registered an attestation key.")
		}
		if err != nil {
			return err
		}
		st, err = v.status(tx, sub, a, v.now())
		return err
	})
	return st, err
}

// Record reads the subject's attestation record and its status in one
// transaction, so that the two agree (a page showing the verdict beside
// the PCRs it judged); a subject that never registered is not found.
func (v *Verifier) Record(ctx context.Context, sub Subject) (*store.Attestation, Status, error) {
	var a *store.Attestation
	var st Status
	err := v.cfg.Store.View(ctx, func(tx *store.Tx) (err error) {
		a, err = tx.GetAttestation(sub.key)
		if errors.Is(err, store.ErrNotFound) {
			return refusal.NotFound(api.CodeNotRegistered, "The "+sub.kind()+" has never registered an attestation key.")
		}
		if err != nil {
			return err
		}
		st, err = v.status(tx, sub, a, v.now())
		return err
	})
	return a, st, err
}

// recordStatus is the status a's record says as of now: a verdict whose
// evidence is overdue reads stale even before MarkStale records it.
func recordStatus(a *store.Attestation, now time.Time) Status {
	if !a.StaleAt.IsZero() && !now.Before(a.StaleAt) {
		c := *a
		goStale(&c, now)
		a = &c
	}
	out := Status{InstanceID: a.InstanceID, State: Unregistered, RegisteredAt: a.RegisteredAt, Verdict: a.Verdict,
		Reasons: a.Reasons, VerifiedAt: a.VerifiedAt, PCRs: a.PCRs, Policy: a.PolicyName, IMAEntries: a.IMAEntries}
	switch {
	case !a.RegisteredAt.IsZero():
		out.State = Registered
	case a.ChallengeHash != nil:
		out.State = Challenged
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

// status is sub's attestation status as of now. An instance's carries its
// host's verdict, its provisioning record and the overall answer.
func (v *Verifier) status(tx *store.Tx, sub Subject, a *store.Attestation, now time.Time) (Status, error) {
	var host HostVerdict
	if sub.vtpm != nil {
		var err error
		if host, err = hostVerdict(tx, sub.vtpm.Host, now); err != nil {
			return Status{}, err
		}
	}
	return v.statusWith(sub, a, host, now), nil
}

// statusWith is status, given an instance's host's verdict (unused for a
// host).
func (v *Verifier) statusWith(sub Subject, a *store.Attestation, host HostVerdict, now time.Time) Status {
	out := recordStatus(a, now)
	vt := sub.vtpm
	if vt == nil {
		out.InstanceID, out.HostName = "", sub.host
		return out
	}
	p := v.Provisioning(vt)
	out.Host, out.Provisioning = &host, &p
	out.Overall, out.Summary = overall(out.Verdict, out.Reasons, host, p)
	return out
}

// Provisioning is vt's provisioning record: the host vtpmd placed it on
// and its EK certificates, checked against the deployment CA and against
// the EKs recorded when vtpmd made the TPM.
func (v *Verifier) Provisioning(vt *store.VTPM) api.Provisioning {
	p := api.Provisioning{Host: vt.Host, Verified: len(vt.EKs) > 0}
	if len(vt.EKs) == 0 {
		p.Reason = "the vTPM has no endorsement key yet"
	}
	for _, ek := range vt.EKs {
		c := v.checkEK(ek)
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
func (v *Verifier) checkEK(ek store.EK) ekCheck {
	h := sha256.New()
	h.Write(ek.CertDER)
	h.Write(ek.PublicDER)
	var key [sha256.Size]byte
	h.Sum(key[:0])
	if c, ok := v.ekChecks.Load(key); ok {
		return c.(ekCheck)
	}
	var c ekCheck
	cert, err := x509.ParseCertificate(ek.CertDER)
	if err != nil {
		c.failure = fmt.Sprintf("the %s EK has no readable certificate", ek.Kind)
	} else {
		c.cert = &api.EKCertificate{Kind: ek.Kind, Issuer: cert.Issuer.String(), Serial: cert.SerialNumber.Text(16), NotBefore: cert.NotBefore}
		pub, err := attest.VerifyEKCertificate(ek.CertDER, v.deploymentCA())
		if err != nil {
			c.failure = err.Error()
		} else if der, err := x509.MarshalPKIXPublicKey(pub); err != nil || !bytes.Equal(der, ek.PublicDER) {
			c.failure = fmt.Sprintf("the %s EK certificate certifies another key than the EK vtpmd made", ek.Kind)
		}
	}
	v.ekChecks.Store(key, c)
	return c
}

// deploymentCA is the pool of the deployment CA chain, read once.
func (v *Verifier) deploymentCA() *x509.CertPool {
	v.caOnce.Do(func() {
		if v.cfg.CAChainPEM == nil {
			return
		}
		v.caPool = x509.NewCertPool()
		v.caPool.AppendCertsFromPEM(v.cfg.CAChainPEM())
	})
	return v.caPool
}

// HostVerdicts are the named hosts' own verdicts as their instances read
// them (store.VerdictUnattested for a host whose TPM never registered),
// by name, in one read.
func (v *Verifier) HostVerdicts(ctx context.Context, names []string) (map[string]HostVerdict, error) {
	out := make(map[string]HostVerdict, len(names))
	now := v.now()
	err := v.cfg.Store.View(ctx, func(tx *store.Tx) error {
		for _, n := range names {
			h, err := hostVerdict(tx, n, now)
			if err != nil {
				return err
			}
			out[n] = h
		}
		return nil
	})
	return out, err
}

// hostVerdict is host's own verdict as of now, as its instances read it.
func hostVerdict(tx *store.Tx, host string, now time.Time) (HostVerdict, error) {
	a, err := tx.GetAttestationWithoutLogs(store.HostKey(host))
	if errors.Is(err, store.ErrNotFound) {
		a, err = nil, nil
	}
	if err != nil {
		return HostVerdict{}, err
	}
	return hostVerdictOf(host, a, now), nil
}

// hostVerdictOf is hostVerdict by the host's record a (nil: it has none).
func hostVerdictOf(host string, a *store.Attestation, now time.Time) HostVerdict {
	h := HostVerdict{Name: host, Verdict: store.VerdictUnattested}
	if a == nil {
		return h
	}
	if hs := recordStatus(a, now); hs.State == Registered {
		h.Verdict, h.Reasons, h.VerifiedAt, h.EvidenceAt = hs.Verdict, hs.Reasons, hs.VerifiedAt, a.EvidenceAt
	}
	return h
}

// overall is the tenant's one answer about an instance: its own verdict
// first, then its vTPM's provenance, then its host's verdict.
func overall(verdict store.Verdict, reasons []string, host HostVerdict, p api.Provisioning) (store.Verdict, string) {
	first := func(rs []string) string {
		if len(rs) == 0 {
			return ""
		}
		return ": " + rs[0]
	}
	switch {
	case verdict != store.VerdictTrusted:
		return verdict, "the VM is " + string(verdict) + first(reasons)
	case !p.Verified:
		return store.VerdictUntrusted, "VM trusted, but its vTPM is not one vtpmd provisioned: " + p.Reason
	case host.Verdict == store.VerdictTrusted:
		return store.VerdictTrusted, "VM trusted on trusted host " + host.Name
	case host.Verdict == store.VerdictUnattested:
		return store.VerdictUntrusted, "VM trusted, but host " + host.Name + " does not attest: its integrity is unknown"
	default:
		return host.Verdict, "VM trusted, but host " + host.Name + " is " + string(host.Verdict) + first(host.Reasons)
	}
}

// History is the subject's attestation events, oldest first:
// registrations, policies, and each change of its verdict and its host's.
// An instance's are its vTPM's, not an earlier one's of the instance id.
func (v *Verifier) History(ctx context.Context, sub Subject) ([]store.Event, error) {
	incarnation := "" // a host's
	if sub.vtpm != nil {
		incarnation = sub.vtpm.Incarnation
	}
	var evs []store.Event
	if err := v.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { evs, err = tx.ListEvents(sub.key, incarnation); return err }); err != nil {
		return nil, err
	}
	return slices.DeleteFunc(evs, func(e store.Event) bool { return !attestationAction(e.Action) }), nil
}
