package store

import (
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// HostKey is the key of a host's own attestation record, which shares the
// table with instances' records (keyed by instance id, a UUID).
func HostKey(name string) string { return "host:" + name }

// Verdict is the verifier's answer about an instance's or a host's
// integrity, as its attestation record keeps it.
type Verdict string

const (
	// VerdictPending: registered, and no evidence judged by a policy yet.
	VerdictPending Verdict = "pending"
	// VerdictTrusted: the last genuine evidence met the policy.
	VerdictTrusted Verdict = "trusted"
	// VerdictUntrusted: the last evidence was not genuine, or did not
	// meet the policy.
	VerdictUntrusted Verdict = "untrusted"
	// VerdictStale: no genuine evidence for longer than the verifier
	// allows.
	VerdictStale Verdict = "stale"
	// VerdictUnattested is a host's verdict as its instances read it when
	// it has no attestation record (its TPM never registered, or was
	// forgotten). No record holds it.
	VerdictUnattested Verdict = "unattested"
)

// Attestation is an instance's (or a host's) attestation record: the registered AK, the
// pending challenge or nonce, the last accepted evidence, the policy and
// the verdict. Byte fields are TPM structures or digests; none is a secret
// (the challenge is kept only as its hash).
type Attestation struct {
	InstanceID string `json:"-"`
	EKKind     string `json:"ek_kind"`
	// EKPublic (PKIX) is the EK a host's TPM registered with; a host keeps
	// one. Instances' EKs are in their vTPM records.
	EKPublic []byte `json:"ek_public,omitempty"`
	AKPublic []byte `json:"ak_public"` // TPM2B_PUBLIC
	// A registration waiting for its credential: ChallengeHash is SHA-256
	// of the credential the TPM must give back; the pending AK (and, for
	// a host, EK) replace the registered ones only when it does, so that
	// an unproven registration disturbs nothing.
	ChallengeHash []byte `json:"challenge_hash,omitempty"`
	PendingAK     []byte `json:"pending_ak,omitempty"`
	PendingEK     []byte `json:"pending_ek,omitempty"`
	PendingEKKind string `json:"pending_ek_kind,omitempty"`
	// AgentTokenHash is SHA-256 of the bearer token the registered agent
	// got: nonces, evidence and long polls need it.
	AgentTokenHash []byte    `json:"agent_token_hash,omitempty"`
	RegisteredAt   time.Time `json:"registered_at,omitzero"`
	// Nonce is the one a quote must answer; used once, until NonceExpires.
	Nonce        []byte    `json:"nonce,omitempty"`
	NonceExpires time.Time `json:"nonce_expires,omitzero"`
	// The last accepted quote's counters, PCRs and event log.
	Clock        uint64         `json:"clock,omitempty"`
	ResetCount   uint32         `json:"reset_count,omitempty"`
	RestartCount uint32         `json:"restart_count,omitempty"`
	PCRs         map[int][]byte `json:"pcrs,omitempty"`
	EventLog     []byte         `json:"-"` // in the logs, see attestationLogs
	// IMALog is this boot's IMA log as far as the quotes vouched for it:
	// IMAEntries entries, which replay to PCRs[10]; an agent's next
	// evidence may send only the entries after. (Records written before
	// kept the whole log sent: its first IMAEntries entries count.)
	IMALog     []byte `json:"-"`
	IMAEntries int    `json:"ima_entries,omitempty"`
	// Policy: reference PCR values or allowed digests per PCR, and the
	// log they were learned from.
	PolicyPCRs     map[int][]byte   `json:"policy_pcrs,omitempty"`
	PolicyDigests  map[int][][]byte `json:"policy_digests,omitempty"`
	PolicyEventLog []byte           `json:"-"`
	// PolicyName and PolicyID name the policy copied, if any (learned
	// ones are no named policy's): its name then, and its identity
	// (Policy.ID), which a policy deleted and made again under the name
	// does not share.
	PolicyName string `json:"policy_name,omitempty"`
	PolicyID   string `json:"policy_id,omitempty"`
	// EvidenceAt is when the last genuine evidence arrived.
	EvidenceAt time.Time `json:"evidence_at,omitzero"`
	// Verdict: pending, trusted, untrusted or stale, with reasons.
	Verdict    Verdict   `json:"verdict"`
	Reasons    []string  `json:"reasons,omitempty"`
	VerifiedAt time.Time `json:"verified_at,omitzero"`
	// StaleAt is when the verdict turns stale unless evidence arrives;
	// zero when it cannot (unregistered, or stale already).
	StaleAt time.Time `json:"stale_at,omitzero"`

	// withoutLogs marks a record read by GetAttestationWithoutLogs,
	// which PutAttestation refuses.
	withoutLogs bool
}

// attestationLogs are the logs of an attestation record, kept apart from
// the rest of it (the attestations table's logs column; the rest is its
// doc): an event log is tens of KiB and an IMA log may be MiBs, and only
// judging evidence reads them, never a status, a token check or a key
// release.
type attestationLogs struct {
	EventLog       []byte `json:"event_log,omitempty"`
	IMALog         []byte `json:"ima_log,omitempty"`
	PolicyEventLog []byte `json:"policy_event_log,omitempty"`
}

// GetAttestation reads an instance's attestation; ErrNotFound if it never
// registered.
func (t *Tx) GetAttestation(instanceID string) (*Attestation, error) {
	var doc, logs string
	err := t.queryRow(`SELECT doc, logs FROM attestations WHERE instance_id=?`, instanceID).Scan(&doc, &logs)
	if err != nil {
		return nil, attestationNotFound(instanceID, err)
	}
	a := &Attestation{InstanceID: instanceID}
	var l attestationLogs
	if err := json.Unmarshal([]byte(doc), a); err != nil {
		return nil, fmt.Errorf("decoding attestation of %s: %w", instanceID, err)
	}
	if err := json.Unmarshal([]byte(logs), &l); err != nil {
		return nil, fmt.Errorf("decoding the logs of the attestation of %s: %w", instanceID, err)
	}
	a.EventLog, a.IMALog, a.PolicyEventLog = l.EventLog, l.IMALog, l.PolicyEventLog
	return a, nil
}

// GetAttestationWithoutLogs reads an instance's attestation as
// GetAttestation does, but not its logs (EventLog, IMALog and
// PolicyEventLog are nil): what a status, a token check or a key release
// reads, at a cost that does not grow with the logs. PutAttestation
// refuses the record it returns.
func (t *Tx) GetAttestationWithoutLogs(instanceID string) (*Attestation, error) {
	var doc string
	err := t.queryRow(`SELECT doc FROM attestations WHERE instance_id=?`, instanceID).Scan(&doc)
	if err != nil {
		return nil, attestationNotFound(instanceID, err)
	}
	return withoutLogs(instanceID, doc)
}

// GetVTPMAttested reads the vTPM of an instance with its attestation
// record and its host's, both without logs (as GetAttestationWithoutLogs
// reads them), in one statement: what an agent's request to the key
// broker is judged by. A record that does not exist is nil; ErrNotFound
// if the instance has no vTPM.
func (t *Tx) GetVTPMAttested(instanceID string) (v *VTPM, own, host *Attestation, err error) {
	var ownDoc, hostDoc sql.NullString
	row := t.queryRow(`SELECT `+vtpmColumns+`,
		(SELECT doc FROM attestations WHERE attestations.instance_id = vtpms.instance_id),
		(SELECT doc FROM attestations WHERE attestations.instance_id = 'host:' || vtpms.host)
		FROM vtpms WHERE instance_id=?`, instanceID)
	if v, err = scanVTPM(row, &ownDoc, &hostDoc); err != nil {
		return nil, nil, nil, fmt.Errorf("vtpm %s: %w", instanceID, notFound(err))
	}
	t.saw(v.InstanceID, v.Incarnation)
	if ownDoc.Valid {
		if own, err = withoutLogs(v.InstanceID, ownDoc.String); err != nil {
			return nil, nil, nil, err
		}
	}
	if hostDoc.Valid {
		if host, err = withoutLogs(HostKey(v.Host), hostDoc.String); err != nil {
			return nil, nil, nil, err
		}
	}
	return v, own, host, nil
}

// withoutLogs decodes the document of key's record, read without its logs.
func withoutLogs(key, doc string) (*Attestation, error) {
	a := &Attestation{InstanceID: key, withoutLogs: true}
	if err := json.Unmarshal([]byte(doc), a); err != nil {
		return nil, fmt.Errorf("decoding attestation of %s: %w", key, err)
	}
	return a, nil
}

func attestationNotFound(instanceID string, err error) error {
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("attestation of %s: %w", instanceID, ErrNotFound)
	}
	return err
}

// PutAttestation writes a (insert or replace); for an instance's, its
// vTPM's row takes the verdict, policy (name and identity) and evidence
// time the console sorts and filters by (see ListInstances). A record
// read without its logs cannot be written: that would drop them.
func (t *Tx) PutAttestation(a *Attestation) error {
	if a.withoutLogs {
		return fmt.Errorf("the attestation of %s was read without its logs: writing it would drop them", a.InstanceID)
	}
	doc, err := json.Marshal(a)
	if err != nil {
		return err
	}
	logs, err := json.Marshal(attestationLogs{EventLog: a.EventLog, IMALog: a.IMALog, PolicyEventLog: a.PolicyEventLog})
	if err != nil {
		return err
	}
	staleAt := ""
	if !a.StaleAt.IsZero() {
		staleAt = sortable(a.StaleAt)
	}
	_, err = t.exec(`INSERT INTO attestations (instance_id, doc, logs, updated_at, stale_at) VALUES (?,?,?,?,?)
		ON CONFLICT(instance_id) DO UPDATE SET doc=excluded.doc, logs=excluded.logs, updated_at=excluded.updated_at, stale_at=excluded.stale_at`,
		a.InstanceID, string(doc), string(logs), stamp(t.now), staleAt)
	if err != nil || strings.HasPrefix(a.InstanceID, HostKey("")) {
		return err
	}
	// The instance's row keeps what the console sorts by; evidence to the
	// minute, so that the row is written about once a minute at most.
	evidenceAt := ""
	if !a.EvidenceAt.IsZero() {
		evidenceAt = sortable(a.EvidenceAt.Truncate(time.Minute))
	}
	_, err = t.exec(`UPDATE vtpms SET verdict=?, policy_name=?, policy_id=?, evidence_at=?
		WHERE instance_id=? AND (verdict<>? OR policy_name<>? OR policy_id<>? OR evidence_at<>?)`,
		string(a.Verdict), a.PolicyName, a.PolicyID, evidenceAt, a.InstanceID, string(a.Verdict), a.PolicyName, a.PolicyID, evidenceAt)
	return err
}

// OverdueAttestations lists the keys of the attestations whose StaleAt
// has passed by now.
func (t *Tx) OverdueAttestations(now time.Time) ([]string, error) {
	rows, err := t.query(
		`SELECT instance_id FROM attestations WHERE stale_at != '' AND stale_at <= ? ORDER BY stale_at`, sortable(now))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var keys []string
	for rows.Next() {
		var k string
		if err := rows.Scan(&k); err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	return keys, rows.Err()
}

// sortable formats t so that text order is time order (RFC 3339 with
// trailing zeros trimmed is not).
func sortable(t time.Time) string { return t.UTC().Format(sortableLayout) }

const sortableLayout = "2006-01-02T15:04:05.000000000Z"

// DeleteAttestation removes an instance's attestation, if any, and a
// request for fresh evidence waiting for its agent.
func (t *Tx) DeleteAttestation(instanceID string) error {
	if _, err := t.exec(`DELETE FROM attestations WHERE instance_id=?`, instanceID); err != nil {
		return err
	}
	_, err := t.exec(`DELETE FROM refresh_requests WHERE subject=?`, instanceID)
	return err
}
