package attest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"slices"
)

// Event is one measurement of a TCG crypto-agile event log (TCG PC Client
// Platform Firmware Profile, TCG_PCR_EVENT2), with its SHA-256 digest.
type Event struct {
	Index  int // position in the log, from 0 (the Spec ID header)
	PCR    int
	Type   uint32
	Digest []byte // SHA-256
	Data   []byte
}

// Event types the verifier names in its reasons.
var eventTypeNames = map[uint32]string{
	0x00000001: "EV_POST_CODE", 0x00000003: "EV_NO_ACTION", 0x00000004: "EV_SEPARATOR",
	0x00000005: "EV_ACTION", 0x00000006: "EV_EVENT_TAG", 0x00000007: "EV_S_CRTM_CONTENTS",
	0x00000008: "EV_S_CRTM_VERSION", 0x00000009: "EV_CPU_MICROCODE", 0x0000000a: "EV_PLATFORM_CONFIG_FLAGS",
	0x0000000b: "EV_TABLE_OF_DEVICES", 0x0000000c: "EV_COMPACT_HASH", 0x0000000d: "EV_IPL",
	0x0000000e: "EV_IPL_PARTITION_DATA", 0x0000000f: "EV_NONHOST_CODE", 0x00000010: "EV_NONHOST_CONFIG",
	0x00000011: "EV_NONHOST_INFO", 0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
	0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG", 0x80000002: "EV_EFI_VARIABLE_BOOT",
	0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION", 0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
	0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER", 0x80000006: "EV_EFI_GPT_EVENT", 0x80000007: "EV_EFI_ACTION",
	0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB", 0x80000009: "EV_EFI_HANDOFF_TABLES",
	0x8000000a: "EV_EFI_PLATFORM_FIRMWARE_BLOB2", 0x8000000b: "EV_EFI_HANDOFF_TABLES2",
	0x800000e0: "EV_EFI_VARIABLE_AUTHORITY",
}

// TypeName is the event type's name in the TCG specification.
func (e Event) TypeName() string {
	if n, ok := eventTypeNames[e.Type]; ok {
		return n
	}
	return fmt.Sprintf("event type 0x%x", e.Type)
}

var le = binary.LittleEndian

const (
	evNoAction  = 0x00000003
	algSHA256   = 0x000b
	maxEvents   = 10000   // a firmware log has a few hundred
	maxEventLen = 1 << 20 // bounds one event's data
)

// ParseEventLog reads a crypto-agile event log as the kernel exposes it
// (/sys/kernel/security/tpm0/binary_bios_measurements): a TCG_PCR_EVENT
// header carrying the "Spec ID Event03" structure with the digest sizes,
// then TCG_PCR_EVENT2 records. It keeps each event's SHA-256 digest.
func ParseEventLog(log []byte) ([]Event, error) {
	r := reader{b: log}
	// The header: pcrIndex, eventType, a SHA-1-sized digest, the Spec ID.
	r.u32()
	if t := r.u32(); t != evNoAction {
		return nil, errors.New("event log: not a crypto-agile log (no Spec ID event first)")
	}
	r.bytes(20)
	spec := r.bytes(int(r.u32()))
	if r.err != nil {
		return nil, fmt.Errorf("event log header: %w", r.err)
	}
	sizes, err := digestSizes(spec)
	if err != nil {
		return nil, err
	}
	if _, ok := sizes.size(algSHA256); !ok {
		return nil, errors.New("event log: no SHA-256 digests")
	}
	// Firmware events average more than 64 bytes (OVMF's: 80): room for
	// all, one allocation (counting them first costs more than the room
	// saves).
	events := make([]Event, 1, min(r.left()/64+1, maxEvents+1))
	events[0] = Event{Index: 0, PCR: 0, Type: evNoAction, Data: spec}
	for r.left() > 0 {
		if len(events) > maxEvents {
			return nil, fmt.Errorf("event log: more than %d events", maxEvents)
		}
		// The fixed fields read straight from the bytes, one bounds check
		// for the three; what is not there reads as 0, as the reader's.
		var pcr, typ, n uint32
		if h := r.bytes(12); h != nil {
			pcr, typ, n = le.Uint32(h), le.Uint32(h[4:]), le.Uint32(h[8:])
		}
		// Filled in place: no copy of the event, with its pointers, after.
		events = append(events, Event{Index: len(events), PCR: int(pcr), Type: typ})
		e := &events[len(events)-1]
		if n > uint32(sizes.n) {
			return nil, fmt.Errorf("event log: event %d has %d digests", e.Index, n)
		}
		for range n {
			var alg uint16
			if a := r.bytes(2); a != nil {
				alg = le.Uint16(a)
			}
			size, ok := sizes.size(alg)
			if !ok {
				return nil, fmt.Errorf("event log: event %d uses algorithm 0x%x the header does not list", e.Index, alg)
			}
			d := r.bytes(size)
			if alg == algSHA256 {
				e.Digest = d
			}
		}
		var size uint32
		if s := r.bytes(4); s != nil {
			size = le.Uint32(s)
		}
		if size > maxEventLen {
			return nil, fmt.Errorf("event log: event %d claims %d bytes", e.Index, size)
		}
		e.Data = r.bytes(int(size))
		if r.err != nil {
			return nil, fmt.Errorf("event log: event %d: %w", e.Index, r.err)
		}
		if e.Digest == nil {
			return nil, fmt.Errorf("event log: event %d has no SHA-256 digest", e.Index)
		}
		if e.PCR < 0 || e.PCR > 23 {
			return nil, fmt.Errorf("event log: event %d extends PCR %d", e.Index, e.PCR)
		}
	}
	return events, nil
}

// digestTable is the algorithm table of a TCG_EfiSpecIDEvent: each
// algorithm once, with its digest size (a log lists one to four).
type digestTable struct {
	n     int
	algs  [maxAlgs]uint16
	sizes [maxAlgs]int
}

const maxAlgs = 16

func (t *digestTable) size(alg uint16) (int, bool) {
	for i, a := range t.algs[:t.n] {
		if a == alg {
			return t.sizes[i], true
		}
	}
	return 0, false
}

// digestSizes reads the algorithm table of a TCG_EfiSpecIDEvent; an
// algorithm listed twice has the last size given.
func digestSizes(spec []byte) (digestTable, error) {
	var t digestTable
	r := reader{b: spec}
	if sig := r.bytes(16); !bytes.Equal(sig, []byte("Spec ID Event03\x00")) {
		return t, errors.New("event log: the header is not a Spec ID Event03")
	}
	r.bytes(4 + 4) // platformClass, versions, errata, uintnSize
	n := r.u32()
	if n > maxAlgs {
		return t, fmt.Errorf("event log: %d digest algorithms", n)
	}
	for range n {
		alg, size := r.u16(), int(r.u16())
		i := slices.Index(t.algs[:t.n], alg)
		if i < 0 {
			i = t.n
			t.n++
		}
		t.algs[i], t.sizes[i] = alg, size
	}
	if r.err != nil || n == 0 {
		return t, errors.New("event log: malformed Spec ID event")
	}
	return t, nil
}

// Log is a firmware event log parsed and replayed, a pure function of its
// bytes: nothing in it depends on the evidence that carried it, so one
// Log serves every quote whose log has the same bytes. It is never
// changed after ParseLog, and shares the bytes (no copy: a verifier's hot
// path), which must not be changed either.
type Log struct {
	raw      []byte
	events   []Event
	replayed pcrBank // what events replay to
}

// ParseLog parses the crypto-agile event log b (ParseEventLog) and
// replays it.
func ParseLog(b []byte) (*Log, error) {
	events, err := ParseEventLog(b)
	if err != nil {
		return nil, err
	}
	l := &Log{raw: b, events: events}
	l.replayed.replay(events)
	return l, nil
}

// Bytes is the log as it was sent.
func (l *Log) Bytes() []byte { return l.raw }

// Replay computes the SHA-256 PCR values the events extend. The locality
// of the startup, when the log records one (EV_NO_ACTION "StartupLocality"
// in PCR 0), is PCR 0's starting value, as the TPM sets it.
func Replay(events []Event) map[int][]byte {
	return replay(events).values()
}

// pcrBank is what a log replays to: PCR i is v[i] if bit i of set is on
// (the log extends it, or sets its locality), else the log leaves it alone.
type pcrBank struct {
	set uint32
	v   [24][sha256.Size]byte
}

func (b *pcrBank) value(i int) ([]byte, bool) {
	if i < 0 || i >= len(b.v) || b.set&(1<<i) == 0 {
		return nil, false
	}
	return b.v[i][:], true
}

func (b *pcrBank) values() map[int][]byte {
	pcrs := make(map[int][]byte, bits.OnesCount32(b.set))
	for i := range b.v {
		if v, ok := b.value(i); ok {
			pcrs[i] = v
		}
	}
	return pcrs
}

func replay(events []Event) *pcrBank {
	b := new(pcrBank)
	b.replay(events)
	return b
}

// replay extends b, all zeros, with events.
func (b *pcrBank) replay(events []Event) {
	var buf [2 * sha256.Size]byte // PCR || digest
	h := sha256.New()             // one hash reset per extend costs less than a Sum256
	for _, e := range events {
		if e.PCR < 0 || e.PCR >= len(b.v) { // ParseEventLog bounds PCR to 0–23
			continue
		}
		if e.Type == evNoAction {
			if e.PCR == 0 && bytes.HasPrefix(e.Data, []byte("StartupLocality\x00")) && len(e.Data) == 17 {
				b.v[0] = [sha256.Size]byte{sha256.Size - 1: e.Data[16]}
				b.set |= 1
			}
			continue
		}
		copy(buf[:sha256.Size], b.v[e.PCR][:])
		copy(buf[sha256.Size:], e.Digest)
		h.Reset()
		h.Write(buf[:])
		h.Sum(b.v[e.PCR][:0])
		b.set |= 1 << e.PCR
	}
}

// reader reads fixed-size fields in one byte order (event logs are
// little-endian, TPM structures big-endian), remembering the first overrun.
// The order is a flag, not a binary.ByteOrder: no interface call per field.
type reader struct {
	b         []byte
	off       int
	bigEndian bool
	err       error
}

func (r *reader) left() int { return len(r.b) - r.off }

func (r *reader) bytes(n int) []byte {
	if r.err != nil || n < 0 || r.left() < n {
		if r.err == nil {
			r.err = errors.New("truncated")
		}
		return nil
	}
	b := r.b[r.off : r.off+n]
	r.off += n
	return b
}

func (r *reader) u8() uint8 {
	if b := r.bytes(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	b := r.bytes(2)
	switch {
	case b == nil:
		return 0
	case r.bigEndian:
		return binary.BigEndian.Uint16(b)
	}
	return binary.LittleEndian.Uint16(b)
}

func (r *reader) u32() uint32 {
	b := r.bytes(4)
	switch {
	case b == nil:
		return 0
	case r.bigEndian:
		return binary.BigEndian.Uint32(b)
	}
	return binary.LittleEndian.Uint32(b)
}

func (r *reader) u64() uint64 {
	b := r.bytes(8)
	switch {
	case b == nil:
		return 0
	case r.bigEndian:
		return binary.BigEndian.Uint64(b)
	}
	return binary.LittleEndian.Uint64(b)
}
