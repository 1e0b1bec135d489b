package attest

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"maps"
	"slices"
)

// Boot is what genuine evidence showed of a boot: the quoted PCR values,
// the firmware's events, and the IMA entries the quote covers.
type Boot struct {
	PCRs   map[int][]byte
	Events []Event
	IMA    []IMAEntry
}

// Policy is a measured-boot reference. PCRs holds the SHA-256 value a PCR
// must hold exactly. Digests allows, per PCR, a set of digests its events
// may carry (firmware events' SHA-256 digests; for PCR 10, IMA's file
// digests): what lets one policy accept any of several known-good kernels,
// or judge IMA, whose PCR value differs on every machine. EventLog, when
// learned from a known-good boot, traces a PCR mismatch to the event that
// differs; it is read only then.
type Policy struct {
	PCRs     map[int][]byte
	Digests  map[int][][]byte
	EventLog []byte
}

// Learn takes a known-good boot as the reference values of the given PCRs
// (like GCP's integrity baseline), with its event log.
func Learn(b Boot, log []byte, which []int) Policy {
	p := Policy{PCRs: map[int][]byte{}, EventLog: log}
	for _, i := range which {
		if v, ok := b.PCRs[i]; ok {
			p.PCRs[i] = bytes.Clone(v)
		}
	}
	return p
}

// LearnDigests takes the digests a known-good boot's events carry in the
// given PCRs as the allowed ones; for PCR 10, IMA's file digests.
func LearnDigests(b Boot, which []int) Policy {
	p := Policy{Digests: map[int][][]byte{}}
	for _, i := range which {
		var ds [][]byte
		for _, d := range digestsOf(b, i) {
			if d != nil && !slices.ContainsFunc(ds, func(x []byte) bool { return bytes.Equal(x, d) }) {
				ds = append(ds, bytes.Clone(d))
			}
		}
		if ds != nil {
			p.Digests[i] = ds
		}
	}
	return p
}

// measurement is one event or IMA entry as a digest policy sees it.
type measurement struct {
	name   string
	digest []byte // nil for an IMA violation
}

// measurementsOf lists what extended PCR i in b: its IMA entries for PCR
// 10 when b has an IMA log, else its firmware events.
func measurementsOf(b Boot, i int) []measurement {
	var out []measurement
	if i == IMAPCR && b.IMA != nil {
		for _, e := range b.IMA {
			m := measurement{name: e.String()}
			if !e.Violation {
				m.digest = e.FileDigest
			}
			out = append(out, m)
		}
		return out
	}
	for _, e := range b.Events {
		if e.PCR == i && e.Type != evNoAction {
			out = append(out, measurement{name: fmt.Sprintf("event #%d (%s)", e.Index, e.TypeName()), digest: e.Digest})
		}
	}
	return out
}

func digestsOf(b Boot, i int) [][]byte {
	var out [][]byte
	for _, m := range measurementsOf(b, i) {
		out = append(out, m.digest)
	}
	return out
}

// Mismatch is one reason a boot does not meet a policy.
type Mismatch struct {
	PCR       int
	Want, Got []byte
	// Event describes the first event of this PCR that differs from the
	// reference boot's, when both logs are known; for a digest policy, the
	// measurement it does not allow.
	Event string
}

func (m Mismatch) String() string {
	if m.Want == nil {
		return fmt.Sprintf("PCR %d: %s", m.PCR, m.Event)
	}
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

// Evaluate compares a boot with p. No mismatches means trusted.
func Evaluate(p Policy, b Boot) []Mismatch {
	var out []Mismatch
	for _, i := range slices.Sorted(maps.Keys(p.PCRs)) {
		want, got := p.PCRs[i], b.PCRs[i]
		if bytes.Equal(want, got) {
			continue
		}
		out = append(out, Mismatch{PCR: i, Want: want, Got: got, Event: firstDifference(p.EventLog, b.Events, i)})
	}
	for _, i := range slices.Sorted(maps.Keys(p.Digests)) {
		if m, bad := disallowed(p.Digests[i], b, i); bad {
			out = append(out, Mismatch{PCR: i, Event: m})
		}
	}
	return out
}

// disallowed describes the measurements of PCR i in b that allowed does
// not list; a PCR with no measurements at all is disallowed too (a boot
// that skipped measuring would otherwise pass).
func disallowed(allowed [][]byte, b Boot, i int) (string, bool) {
	ms := measurementsOf(b, i)
	if len(ms) == 0 {
		return "nothing was measured", true
	}
	var bad []measurement
	for _, m := range ms {
		if m.digest == nil || !slices.ContainsFunc(allowed, func(a []byte) bool { return bytes.Equal(a, m.digest) }) {
			bad = append(bad, m)
		}
	}
	if len(bad) == 0 {
		return "", false
	}
	what := "has a digest the policy does not allow"
	if bad[0].digest == nil {
		what = "is a measurement violation"
	}
	s := bad[0].name + " " + what
	if len(bad) > 1 {
		s += fmt.Sprintf(", and %d more", len(bad)-1)
	}
	return s, true
}

// Judge is the verdict on genuine evidence: trusted when the boot meets
// p, else untrusted with the mismatches as reasons.
func Judge(p Policy, b Boot) Verdict {
	mismatches := Evaluate(p, b)
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
