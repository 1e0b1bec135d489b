package attest

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
)

// Evidence is what a guest agent sends for one attestation.
type Evidence struct {
	Attest    []byte         // TPMS_ATTEST from TPM2_Quote
	Signature []byte         // TPMT_SIGNATURE
	PCRs      map[int][]byte // the SHA-256 PCR values quoted
	EventLog  []byte         // the firmware's crypto-agile event log
	IMALog    []byte         // the kernel's binary IMA log; optional
	// IMAOffset > 0: IMALog holds the entries from this one on, and
	// continues the log the verifier kept (State.IMA, as many entries).
	IMAOffset int
}

// Verdict is the verifier's judgement of one piece of evidence.
type Verdict struct {
	// Genuine: the quote, counters and log held, so the evidence is the
	// TPM's word (whatever the policy says of it).
	Genuine bool
	Trusted bool
	// Reasons say why not: a broken protocol step (signature, nonce,
	// counters, log) or the policy's mismatches, each naming its PCR.
	Reasons []string
	// Mismatches are the policy's reasons, structured (Reasons has them
	// as text, after any protocol failure).
	Mismatches []Mismatch
	Quote      *Quote // nil when the quote itself failed
}

// State is what the verifier keeps of an instance's last accepted
// evidence.
type State struct {
	Quote *Quote
	// Log is a parsed and replayed event log: evidence whose log has the
	// same bytes is neither parsed nor replayed again. Verify returns the
	// last accepted evidence's (agents push the same log every time); a
	// caller may also hand it one a LogCache kept from other evidence.
	Log *Log
	// IMA are the IMA entries the quotes of this boot covered, and IMALog
	// those entries as the kernel logged them (what a caller keeps, to
	// take a continuation: Quote.PCRs[10] is the value they replay to).
	IMA    []IMAEntry
	IMALog []byte
}

// ErrIMAContinuation: evidence continues an IMA log the verifier does not
// hold as it says; the whole log is needed.
var ErrIMAContinuation = errors.New("the IMA log does not continue the one the verifier holds")

// Verify runs every check on ev, in order, for the registered ak: the
// quote's signature, nonce and PCR digest; the counters against the last
// accepted quote; the event log (parsed and replayed here, unless
// prev.Log has its very bytes) replaying to the quoted PCRs it covers;
// the IMA log, if any, replaying to the quoted PCR 10 (a continuation
// (ev.IMAOffset) only of the entries prev holds, in the same boot, from
// the value they replayed to), and no longer than MaxIMALog; then the
// policy (nil: no policy, nothing to judge yet), on the whole IMA log.
// Evidence that breaks the protocol stops at the first failure. It
// returns the verdict and, when the protocol held, the state to keep for
// the next evidence.
func Verify(ak *AK, ev Evidence, nonce []byte, prev State, p *Policy) (Verdict, State) {
	q, err := VerifyQuote(ak, ev.Attest, ev.Signature, nonce, ev.PCRs)
	if err != nil {
		return Verdict{Reasons: []string{err.Error()}}, prev
	}
	if err := CheckProgress(prev.Quote, q); err != nil {
		return Verdict{Reasons: []string{err.Error()}, Quote: q}, prev
	}
	log := prev.Log
	if log == nil || !bytes.Equal(ev.EventLog, log.raw) {
		var err error
		if log, err = ParseLog(ev.EventLog); err != nil {
			return Verdict{Reasons: []string{err.Error()}, Quote: q}, prev
		}
	}
	next := State{Quote: q, Log: log}
	for i := range log.replayed.v {
		// Quoted PCRs the log extends must match it exactly; others (IMA,
		// later stages with logs of their own) are judged by the policy.
		r, ok := log.replayed.value(i)
		if !ok {
			continue
		}
		if v, quoted := q.PCRs[i]; quoted && !bytes.Equal(r, v) {
			return Verdict{Reasons: []string{fmt.Sprintf("the event log does not replay to the quoted PCR %d", i)}, Quote: q}, prev
		}
	}
	if len(ev.IMALog) > 0 || ev.IMAOffset != 0 {
		var err error
		if next.IMA, next.IMALog, err = verifyIMA(ev, q, prev); err != nil {
			return Verdict{Reasons: []string{err.Error()}, Quote: q}, prev
		}
	}
	if p == nil {
		return Verdict{Genuine: true, Reasons: []string{"no policy yet"}, Quote: q}, next
	}
	v := judge(*p, Boot{PCRs: q.PCRs, Events: log.events, IMA: next.IMA}, &log.replayed)
	v.Quote = q
	return v, next
}

// verifyIMA replays ev's IMA log, or its continuation of the one prev
// holds, to the quoted PCR 10; it returns the entries of the boot's log
// the quote covers, parsed and as logged.
func verifyIMA(ev Evidence, q *Quote, prev State) ([]IMAEntry, []byte, error) {
	quoted, ok := q.PCRs[IMAPCR]
	if !ok {
		return nil, nil, fmt.Errorf("an IMA log came without a quote of PCR %d", IMAPCR)
	}
	from, kept, keptLog := make([]byte, sha256.Size), []IMAEntry(nil), []byte(nil)
	if ev.IMAOffset != 0 {
		switch {
		case prev.Quote == nil || ev.IMAOffset != len(prev.IMA) || prev.Quote.PCRs[IMAPCR] == nil:
			return nil, nil, fmt.Errorf("%w: it continues from entry %d, the verifier holds %d entries", ErrIMAContinuation, ev.IMAOffset, len(prev.IMA))
		case q.ResetCount != prev.Quote.ResetCount:
			return nil, nil, fmt.Errorf("%w: it continues the log of a boot before the TPM's last reset", ErrIMAContinuation)
		}
		from, kept, keptLog = prev.Quote.PCRs[IMAPCR], prev.IMA, prev.IMALog
	}
	entries, err := parseIMALog(ev.IMALog, ev.IMAOffset, -1)
	if err != nil {
		return nil, nil, err
	}
	n, err := replayIMAFrom(from, ev.IMAOffset, entries, quoted)
	if err != nil {
		return nil, nil, err
	}
	size := sizeOf(entries[:n])
	if len(keptLog)+size > MaxIMALog {
		return nil, nil, fmt.Errorf("the IMA log has grown past %d MiB, more than the verifier keeps of a boot", MaxIMALog>>20)
	}
	return append(kept[:len(kept):len(kept)], entries[:n]...), append(keptLog[:len(keptLog):len(keptLog)], ev.IMALog[:size]...), nil
}
