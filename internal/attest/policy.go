package attest

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"slices"
)

// Policy is a measured-boot reference: the SHA-256 value each listed PCR
// must hold and, when learned from a known-good boot, that boot's event
// log, so a mismatch can be traced to the event that differs. The log is
// read only when a mismatch needs explaining.
type Policy struct {
	PCRs     map[int][]byte
	EventLog []byte // the reference boot's log; optional
}

// Learn takes a known-good boot as the reference for the given PCRs (like
// GCP's integrity baseline): their quoted values, and the event log.
func Learn(pcrs map[int][]byte, log []byte, which []int) Policy {
	p := Policy{PCRs: map[int][]byte{}, EventLog: log}
	for _, i := range which {
		if v, ok := pcrs[i]; ok {
			p.PCRs[i] = bytes.Clone(v)
		}
	}
	return p
}

// Mismatch is one reason a boot does not meet a policy.
type Mismatch struct {
	PCR       int
	Want, Got []byte
	// Event describes the first event of this PCR that differs from the
	// reference boot's, when both logs are known.
	Event string
}

func (m Mismatch) String() string {
	s := fmt.Sprintf("PCR %d is %s, the policy wants %s", m.PCR, short(m.Got), short(m.Want))
	if m.Event != "" {
		s += ": " + m.Event
	}
	return s
}

func short(b []byte) string {
	if len(b) == 0 {
		return "missing"
	}
	return hex.EncodeToString(b[:min(len(b), 8)]) + "…"
}

// Evaluate compares a boot's quoted PCR values (and its event log, which
// must already replay to them) with p. No mismatches means trusted.
func Evaluate(p Policy, pcrs map[int][]byte, events []Event) []Mismatch {
	var out []Mismatch
	idx := make([]int, 0, len(p.PCRs))
	for i := range p.PCRs {
		idx = append(idx, i)
	}
	slices.Sort(idx)
	for _, i := range idx {
		want, got := p.PCRs[i], pcrs[i]
		if bytes.Equal(want, got) {
			continue
		}
		out = append(out, Mismatch{PCR: i, Want: want, Got: got, Event: firstDifference(p.EventLog, events, i)})
	}
	return out
}

// Judge is the verdict on genuine evidence: trusted when pcrs meet p, else
// untrusted with the mismatches as reasons.
func Judge(p Policy, pcrs map[int][]byte, events []Event) Verdict {
	mismatches := Evaluate(p, pcrs, events)
	v := Verdict{Genuine: true, Trusted: len(mismatches) == 0}
	for _, m := range mismatches {
		v.Reasons = append(v.Reasons, m.String())
	}
	return v
}

// firstDifference names the first event extending pcr that differs
// between the reference log and the current events, or "" if either is
// unknown.
func firstDifference(refLog []byte, cur []Event, pcr int) string {
	ref, err := ParseEventLog(refLog)
	if err != nil || cur == nil {
		return ""
	}
	of := func(events []Event) []Event {
		var out []Event
		for _, e := range events {
			if e.PCR == pcr && e.Type != evNoAction {
				out = append(out, e)
			}
		}
		return out
	}
	r, c := of(ref), of(cur)
	for n := range max(len(r), len(c)) {
		switch {
		case n >= len(c):
			return fmt.Sprintf("the reference boot's event #%d (%s) is missing", r[n].Index, r[n].TypeName())
		case n >= len(r):
			return fmt.Sprintf("event #%d (%s) is not in the reference boot", c[n].Index, c[n].TypeName())
		case r[n].Type != c[n].Type || !bytes.Equal(r[n].Digest, c[n].Digest):
			return fmt.Sprintf("event #%d (%s) differs from the reference boot's", c[n].Index, c[n].TypeName())
		}
	}
	return ""
}
