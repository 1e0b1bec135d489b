package attest

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"slices"
	"sync"
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
// given PCRs as the allowed ones; for PCR 10, IMA's file digests. It
// learns only what the quote vouches for: PCRs it leaves out, or whose
// events do not replay to it, are skipped.
func LearnDigests(b Boot, which []int) Policy {
	p := Policy{Digests: map[int][][]byte{}}
	replayed := sync.OnceValue(func() *pcrBank { return replay(b.Events) })
	for _, i := range which {
		if unvouched(b, i, replayed) != nil {
			continue
		}
		var ds [][]byte
		seen := map[string]bool{} // an IMA log may hold tens of thousands
		for _, d := range digestsOf(b, i) {
			if d != nil && !seen[string(d)] {
				seen[string(d)] = true
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
	ima    *IMAEntry // or
	event  *Event
	digest []byte // nil for an IMA violation
}

// name describes m in a reason (made only for those: an IMA log may hold
// tens of thousands).
func (m measurement) name() string {
	if m.ima != nil {
		return m.ima.String()
	}
	return fmt.Sprintf("event #%d (%s)", m.event.Index, m.event.TypeName())
}

// measurementsOf lists what extended PCR i in b: its IMA entries for PCR
// 10 when b has an IMA log, else its firmware events.
func measurementsOf(b Boot, i int) []measurement {
	var out []measurement
	if i == IMAPCR && b.IMA != nil {
		out = make([]measurement, 0, len(b.IMA))
		for n := range b.IMA {
			m := measurement{ima: &b.IMA[n]}
			if !b.IMA[n].Violation {
				m.digest = b.IMA[n].FileDigest
			}
			out = append(out, m)
		}
		return out
	}
	for n, e := range b.Events {
		if e.PCR == i && e.Type != evNoAction {
			out = append(out, measurement{event: &b.Events[n], digest: e.Digest})
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

// MismatchKind says how a boot fails a policy on one PCR.
type MismatchKind int

const (
	// ValueDiffers: the quoted value is not the one the policy wants.
	ValueDiffers MismatchKind = iota + 1
	// DigestNotAllowed: a measurement carries a digest the policy does
	// not list, is an IMA violation, or nothing was measured at all.
	DigestNotAllowed
	// NotQuoted: the quote leaves the PCR out, so nothing vouches for its
	// value or its events; an event log alone is the guest's word.
	NotQuoted
	// NotReplayed: the PCR's measurements (its firmware events, or for
	// PCR 10 the IMA entries) do not replay to the quoted value.
	NotReplayed
)

// Mismatch is one reason a boot does not meet a policy.
type Mismatch struct {
	PCR  int
	Kind MismatchKind
	// Want and Got are the policy's and the quoted value (ValueDiffers).
	Want, Got []byte
	// Event describes the first event of this PCR that differs from the
	// reference boot's, when both logs are known; for a digest policy, the
	// measurement it does not allow.
	Event string
	// IMA is, for DigestNotAllowed on PCR 10 judged by its IMA log, the
	// first entry the policy does not allow: a file whose digest it does
	// not list, or a violation. Disallowed counts the measurements it
	// does not allow (DigestNotAllowed, any PCR).
	IMA        *IMAEntry
	Disallowed int
}

func (m Mismatch) String() string {
	switch m.Kind {
	case NotQuoted:
		return fmt.Sprintf("PCR %d: the quote leaves it out, so nothing vouches for its events", m.PCR)
	case NotReplayed, DigestNotAllowed:
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

// Evaluate compares a boot with p. No mismatches means trusted. Every PCR
// p names must be in the quote (b.PCRs): a PCR left out is NotQuoted,
// whatever the event log says of it. A value is compared as quoted; the
// measurements a digest policy judges must replay to the quoted value
// (NotReplayed), so that a log cut short, or padded with events the TPM
// never saw, cannot pass; then each must carry an allowed digest.
func Evaluate(p Policy, b Boot) []Mismatch {
	return evaluate(p, b, nil)
}

// evaluate is Evaluate with what b's firmware events replay to, when the
// caller has it (nil: replayed here if a digest policy needs it).
func evaluate(p Policy, b Boot, bank *pcrBank) []Mismatch {
	var out []Mismatch
	var buf [24]int // the PCRs a policy names: sorted without allocating
	for _, i := range sortedKeys(p.PCRs, buf[:0]) {
		want, got := p.PCRs[i], b.PCRs[i]
		switch {
		case got == nil:
			out = append(out, Mismatch{PCR: i, Kind: NotQuoted})
		case !bytes.Equal(want, got):
			out = append(out, Mismatch{PCR: i, Kind: ValueDiffers, Want: want, Got: got, Event: firstDifference(p.EventLog, b.Events, i)})
		}
	}
	if len(p.Digests) == 0 {
		return out
	}
	replayed := func() *pcrBank { return bank }
	if bank == nil {
		replayed = sync.OnceValue(func() *pcrBank { return replay(b.Events) })
	}
	for _, i := range sortedKeys(p.Digests, buf[:0]) {
		if m := unvouched(b, i, replayed); m != nil {
			out = append(out, *m)
		} else if m, bad := disallowed(p.Digests[i], b, i); bad {
			out = append(out, m)
		}
	}
	return out
}

// unvouched says why the measurements of PCR i in b are not the TPM's
// word: the quote leaves i out, or they do not replay to its quoted
// value; nil when they are. replayed is what b's firmware events replay
// to. (A quoted PCR nothing extended is vouched for: nothing to judge.)
func unvouched(b Boot, i int, replayed func() *pcrBank) *Mismatch {
	quoted, ok := b.PCRs[i]
	if !ok {
		return &Mismatch{PCR: i, Kind: NotQuoted}
	}
	got, _ := replayed().value(i)
	what := "the event log"
	if i == IMAPCR && b.IMA != nil {
		got, what = replayIMA(b.IMA), "the IMA log"
	}
	if got != nil && !bytes.Equal(got, quoted) {
		return &Mismatch{PCR: i, Kind: NotReplayed, Event: what + " does not replay to the quoted value"}
	}
	return nil
}

// disallowed is the mismatch of the measurements of PCR i in b that
// allowed does not list; a PCR with no measurements at all is disallowed
// too (a boot that skipped measuring would otherwise pass).
func disallowed(allowed [][]byte, b Boot, i int) (Mismatch, bool) {
	out := Mismatch{PCR: i, Kind: DigestNotAllowed}
	ms := measurementsOf(b, i)
	if len(ms) == 0 {
		out.Event = "nothing was measured"
		return out, true
	}
	set := make(map[string]bool, len(allowed)) // an allowlist may hold tens of thousands
	for _, a := range allowed {
		set[string(a)] = true
	}
	var first *measurement
	for n, m := range ms {
		if m.digest == nil || !set[string(m.digest)] {
			if first == nil {
				first = &ms[n]
			}
			out.Disallowed++
		}
	}
	if first == nil {
		return Mismatch{}, false
	}
	what := "has a digest the policy does not allow"
	if first.digest == nil {
		what = "is a measurement violation"
	}
	out.IMA, out.Event = first.ima, first.name()+" "+what
	if out.Disallowed > 1 {
		out.Event += fmt.Sprintf(", and %d more", out.Disallowed-1)
	}
	return out, true
}

// sortedKeys appends m's keys to buf, sorted.
func sortedKeys[V any](m map[int]V, buf []int) []int {
	for i := range m {
		buf = append(buf, i)
	}
	slices.Sort(buf)
	return buf
}

// Judge is the verdict on genuine evidence: trusted when the boot meets
// p, else untrusted with the mismatches as reasons.
func Judge(p Policy, b Boot) Verdict {
	return judge(p, b, nil)
}

// judge is Judge with what b's firmware events replay to, if known.
func judge(p Policy, b Boot, bank *pcrBank) Verdict {
	mismatches := evaluate(p, b, bank)
	v := Verdict{Genuine: true, Trusted: len(mismatches) == 0, Mismatches: mismatches}
	for _, m := range mismatches {
		v.Reasons = append(v.Reasons, m.String())
	}
	return v
}

// Difference is the first event extending a PCR that differs between a
// reference boot's log and another boot's: Ref is the reference's (nil
// when the other boot has an event more), Got the other's (nil when it
// lacks one the reference has).
type Difference struct {
	PCR      int
	Ref, Got *Event
}

func (d Difference) String() string {
	switch {
	case d.Got == nil:
		return fmt.Sprintf("the reference boot's event #%d (%s) is missing", d.Ref.Index, d.Ref.TypeName())
	case d.Ref == nil:
		return fmt.Sprintf("event #%d (%s) is not in the reference boot", d.Got.Index, d.Got.TypeName())
	}
	return fmt.Sprintf("event #%d (%s) differs from the reference boot's", d.Got.Index, d.Got.TypeName())
}

// FirstDifference finds the first event extending pcr that differs (in
// type or digest) between the reference events ref and the events cur;
// false when they agree.
func FirstDifference(ref, cur []Event, pcr int) (Difference, bool) {
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
		d := Difference{PCR: pcr}
		if n < len(r) {
			d.Ref = &r[n]
		}
		if n < len(c) {
			d.Got = &c[n]
		}
		if d.Ref == nil || d.Got == nil || d.Ref.Type != d.Got.Type || !bytes.Equal(d.Ref.Digest, d.Got.Digest) {
			return d, true
		}
	}
	return Difference{}, false
}

// firstDifference names the first event extending pcr that differs
// between the reference log and the current events, or "" if either is
// unknown.
func firstDifference(refLog []byte, cur []Event, pcr int) string {
	ref, err := ParseEventLog(refLog)
	if err != nil || cur == nil {
		return ""
	}
	if d, ok := FirstDifference(ref, cur, pcr); ok {
		return d.String()
	}
	return ""
}
