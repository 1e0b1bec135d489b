package store

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"
)

// Transfer is a server's request that a host's agent export the state of
// a vTPM as a bundle of Generation (Kind "export"), import Bundle (Kind
// "import"), take in Bundle for a vTPM arriving on the host (Kind
// "receive": migrating to it, or unshelved onto it), or remove the copy of
// a vTPM leaving it (Kind "discard": migrated away, or shelved); or a step
// of a live migration (Kinds "prepare", "send", "settle", "abort",
// "cancel"): the host's watch carries it (Changes.Transfers) until the
// agent answers, or until the agent's current run takes it (TakeTransfer)
// to carry it out apart from its watch; the server that asked withdraws it
// once it has the answer or gives up.
type Transfer struct {
	ID          string // random; names this request
	Host        string
	InstanceID  string
	Incarnation string
	Kind        string
	Generation  int64
	// Bundle is the bundle to import, or the one exported once answered.
	Bundle []byte
	// Answered says the agent answered: with Bundle (an export), with
	// nothing (an import done), or with a refusal (Code and Message).
	Answered bool
	Code     string
	Message  string
	AskedAt  time.Time
	// TakenBy is the agent run (Host.AgentRun) that took the request to
	// carry it out; "" while none has.
	TakenBy string
}

// The kinds of transfer.
const (
	TransferExport  = "export"
	TransferImport  = "import"
	TransferReceive = "receive"
	TransferDiscard = "discard"
	// TransferPrepare: the target of a live migration makes ready to
	// receive the guest; its answer's Bundle describes how to reach it.
	TransferPrepare = "prepare"
	// TransferSend: the source of a live migration migrates the guest to
	// the target Bundle describes; answered once it runs there.
	TransferSend = "send"
	// TransferSettle: the target, the guest running there, drops what only
	// the move needed (a libvirt secret its mode does not keep).
	TransferSettle = "settle"
	// TransferAbort: the target of a live migration that failed removes
	// what it prepared; the guest runs on the source.
	TransferAbort = "abort"
	// TransferCancel: the source of a live migration stops sending (its
	// target went down): its agent, reading its send's input while libvirt
	// migrates, finds the cancel asked and has libvirt abort the
	// migration; the send's answer says how it ended. Nothing is done for
	// the cancel itself.
	TransferCancel = "cancel"
)

// AskTransfer records x, with a new ID; the host's watchers wake to it.
func (t *Tx) AskTransfer(x *Transfer) error {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return err
	}
	x.ID, x.Answered, x.Code, x.Message, x.AskedAt = hex.EncodeToString(id), false, "", "", t.now
	if x.Bundle == nil {
		x.Bundle = []byte{}
	}
	_, err := t.exec(`INSERT INTO state_transfers (id, host, instance_id, incarnation, kind, generation, bundle, answered, code, message, asked_at)
		VALUES (?,?,?,?,?,?,?,0,'','',?)`, x.ID, x.Host, x.InstanceID, x.Incarnation, x.Kind, x.Generation, x.Bundle, stamp(t.now))
	if err != nil {
		return err
	}
	t.changed = append(t.changed, topic{kind: hostTopic, name: x.Host})
	return nil
}

// GetTransfer reads host's request id, with its bundle; ErrNotFound if
// host has none of that id (never asked, or withdrawn).
func (t *Tx) GetTransfer(host, id string) (*Transfer, error) {
	x := &Transfer{}
	var answered int
	var at string
	err := t.queryRow(`SELECT id, host, instance_id, incarnation, kind, generation, bundle, answered, code, message, asked_at, taken_by
		FROM state_transfers WHERE host=? AND id=?`, host, id).
		Scan(&x.ID, &x.Host, &x.InstanceID, &x.Incarnation, &x.Kind, &x.Generation, &x.Bundle, &answered, &x.Code, &x.Message, &at, &x.TakenBy)
	if err != nil {
		return nil, fmt.Errorf("transfer %s on host %s: %w", id, host, notFound(err))
	}
	x.Answered, x.AskedAt = answered != 0, parseStamp(at)
	return x, nil
}

// TakeTransfer records that the run of host's agent that registered the
// host last (Host.AgentRun) carries out host's request id apart from its
// watch: the host's watch no longer hands the request to that run, but
// hands it again to the next (the agent restarted, and what it was doing
// is done again). Taking a request the run took already changes nothing.
// ErrNotFound if the host has no such request waiting (answered,
// withdrawn, or another host's). The host's watchers are not woken: the
// taking agent knows.
func (t *Tx) TakeTransfer(host, id string) error {
	ok, err := changedRow(t.exec(`UPDATE state_transfers SET taken_by = COALESCE((SELECT h.agent_run FROM hosts h WHERE h.name = ?), '')
		WHERE host=? AND id=? AND answered=0`, host, host, id))
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("transfer %s on host %s: %w", id, host, ErrNotFound)
	}
	return nil
}

// AnswerTransfer records host's answer to its request id, once: the
// bundle exported (nil for an import), or a refusal's code and message.
// ErrNotFound if the host has no such request waiting. Its waiters wake.
func (t *Tx) AnswerTransfer(host, id string, bundle []byte, code, message string) error {
	if bundle == nil {
		bundle = []byte{}
	}
	set := `answered=1, code=?, message=?`
	args := []any{code, message}
	if len(bundle) > 0 {
		set += `, bundle=?`
		args = append(args, bundle)
	}
	ok, err := changedRow(t.exec(`UPDATE state_transfers SET `+set+` WHERE host=? AND id=? AND answered=0`, append(args, host, id)...))
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("transfer %s on host %s: %w", id, host, ErrNotFound)
	}
	t.changed = append(t.changed, topic{kind: hostTopic, name: host})
	return nil
}

// TransferAsked says whether host has an unanswered request of kind for
// instanceID's vTPM.
func (t *Tx) TransferAsked(host, instanceID, kind string) (bool, error) {
	var n int
	err := t.queryRow(`SELECT COUNT(*) FROM state_transfers WHERE host=? AND instance_id=? AND kind=? AND answered=0`,
		host, instanceID, kind).Scan(&n)
	return n > 0, err
}

// WithdrawTransfer removes request id: its server has the answer, or
// gave up.
func (t *Tx) WithdrawTransfer(id string) error {
	_, err := t.exec(`DELETE FROM state_transfers WHERE id=?`, id)
	return err
}

// handedTransfers is the condition on state_transfers x of the requests
// the watch hands to the host's agent: not answered, and not taken by the
// run that registered the host last.
const handedTransfers = `x.answered = 0 AND (x.taken_by = '' OR x.taken_by <> COALESCE((SELECT ah.agent_run FROM hosts ah WHERE ah.name = x.host), ''))`

// pendingTransfers are host's requests its agent is handed
// (handedTransfers), without their bundles.
func (t *Tx) pendingTransfers(host string) ([]Transfer, error) {
	rows, err := t.query(`SELECT x.id, x.instance_id, x.incarnation, x.kind, x.generation, x.asked_at, x.taken_by FROM state_transfers x
		WHERE x.host=? AND `+handedTransfers+` ORDER BY x.asked_at, x.id`, host)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Transfer
	for rows.Next() {
		x := Transfer{Host: host}
		var at string
		if err := rows.Scan(&x.ID, &x.InstanceID, &x.Incarnation, &x.Kind, &x.Generation, &at, &x.TakenBy); err != nil {
			return nil, err
		}
		x.AskedAt = parseStamp(at)
		out = append(out, x)
	}
	return out, rows.Err()
}

// SweepTransfers removes the requests asked before cutoff, answered or
// not, and returns them without their bundles. A request is awaited only
// by the server request that asked it, which knows it by its ID and waits
// a bounded time; a re-run of a move asks its step anew. So a request older
// than every such wait is abandoned: its server gave up, or died before it
// withdrew it. Each removed request is returned to the one transaction
// that removed it: servers sweeping at once never both report one.
func (t *Tx) SweepTransfers(cutoff time.Time) ([]Transfer, error) {
	rows, err := t.query(`DELETE FROM state_transfers WHERE asked_at < ?
		RETURNING id, host, instance_id, incarnation, kind, generation, answered, code, asked_at, taken_by`, stamp(cutoff))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Transfer
	for rows.Next() {
		var x Transfer
		var answered int
		var at string
		if err := rows.Scan(&x.ID, &x.Host, &x.InstanceID, &x.Incarnation, &x.Kind, &x.Generation, &answered, &x.Code, &at, &x.TakenBy); err != nil {
			return nil, err
		}
		x.Answered, x.AskedAt = answered != 0, parseStamp(at)
		out = append(out, x)
	}
	return out, rows.Err()
}
