package attest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
)

// referenceEventLog is the straightforward parse the verifier's own is
// held to: every field through the reader, the digest sizes in a map, the
// events appended one by one. Same results, same errors.
func referenceEventLog(log []byte) ([]Event, error) {
	r := reader{b: log}
	r.u32()
	if t := r.u32(); t != evNoAction {
		return nil, errors.New("event log: not a crypto-agile log (no Spec ID event first)")
	}
	r.bytes(20)
	spec := r.bytes(int(r.u32()))
	if r.err != nil {
		return nil, fmt.Errorf("event log header: %w", r.err)
	}
	sr := reader{b: spec}
	if sig := sr.bytes(16); !bytes.Equal(sig, []byte("Spec ID Event03\x00")) {
		return nil, errors.New("event log: the header is not a Spec ID Event03")
	}
	sr.bytes(8)
	na := sr.u32()
	if na > 16 {
		return nil, fmt.Errorf("event log: %d digest algorithms", na)
	}
	sizes := map[uint16]int{}
	for range na {
		alg, size := sr.u16(), int(sr.u16())
		sizes[alg] = size
	}
	if sr.err != nil || na == 0 {
		return nil, errors.New("event log: malformed Spec ID event")
	}
	if _, ok := sizes[algSHA256]; !ok {
		return nil, errors.New("event log: no SHA-256 digests")
	}
	events := []Event{{Index: 0, PCR: 0, Type: evNoAction, Data: spec}}
	for r.left() > 0 {
		if len(events) > maxEvents {
			return nil, fmt.Errorf("event log: more than %d events", maxEvents)
		}
		e := Event{Index: len(events), PCR: int(r.u32()), Type: r.u32()}
		n := r.u32()
		if n > uint32(len(sizes)) {
			return nil, fmt.Errorf("event log: event %d has %d digests", e.Index, n)
		}
		for range n {
			alg := r.u16()
			size, ok := sizes[alg]
			if !ok {
				return nil, fmt.Errorf("event log: event %d uses algorithm 0x%x the header does not list", e.Index, alg)
			}
			if d := r.bytes(size); alg == algSHA256 {
				e.Digest = d
			}
		}
		size := r.u32()
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
		events = append(events, e)
	}
	return events, nil
}

// referenceReplay extends with crypto/sha256 the plain way.
func referenceReplay(events []Event) map[int][]byte {
	pcrs := map[int][]byte{}
	for _, e := range events {
		if e.Type == evNoAction {
			if e.PCR == 0 && bytes.HasPrefix(e.Data, []byte("StartupLocality\x00")) && len(e.Data) == 17 {
				pcrs[0] = append(make([]byte, sha256.Size-1), e.Data[16])
			}
			continue
		}
		v, ok := pcrs[e.PCR]
		if !ok {
			v = make([]byte, sha256.Size)
		}
		d := sha256.Sum256(append(slices.Clone(v), e.Digest...))
		pcrs[e.PCR] = d[:]
	}
	return pcrs
}

// checkEventLog holds ParseEventLog and the replay to the references on b.
func checkEventLog(t *testing.T, b []byte) {
	t.Helper()
	got, err := ParseEventLog(b)
	want, wantErr := referenceEventLog(b)
	if fmt.Sprint(err) != fmt.Sprint(wantErr) {
		t.Fatalf("error %v, the reference says %v", err, wantErr)
	}
	if err != nil {
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%d events, the reference reads %d (or they differ)", len(got), len(want))
	}
	if r, w := Replay(got), referenceReplay(want); !reflect.DeepEqual(r, w) {
		t.Fatalf("replays to %x, the reference to %x", r, w)
	}
}

// event is one TCG_PCR_EVENT2 with the given digests (alg, digest pairs).
func event(pcr, typ uint32, data []byte, digests ...any) []byte {
	b := binary.LittleEndian.AppendUint32(nil, pcr)
	b = binary.LittleEndian.AppendUint32(b, typ)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(digests)/2))
	for i := 0; i < len(digests); i += 2 {
		b = binary.LittleEndian.AppendUint16(b, digests[i].(uint16))
		b = append(b, digests[i+1].([]byte)...)
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// header is a Spec ID event listing the given (alg, size) pairs.
func header(algs ...uint16) []byte {
	spec := append([]byte("Spec ID Event03\x00"), make([]byte, 8)...)
	spec = binary.LittleEndian.AppendUint32(spec, uint32(len(algs)/2))
	for _, a := range algs {
		spec = binary.LittleEndian.AppendUint16(spec, a)
	}
	b := binary.LittleEndian.AppendUint32(nil, 0)
	b = binary.LittleEndian.AppendUint32(b, evNoAction)
	b = append(b, make([]byte, 20)...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(spec)))
	return append(b, spec...)
}

func TestParseEventLogAsReference(t *testing.T) {
	log, _ := fixture(t)
	long := longLog(t)
	d32, d20 := bytes.Repeat([]byte{7}, 32), bytes.Repeat([]byte{5}, 20)
	sha256Only := header(algSHA256, 32)
	both := header(0x0004, 20, algSHA256, 32)
	cases := map[string][]byte{
		"fixture":              log,
		"long":                 long,
		"trailing byte":        append(slices.Clone(log), 0),
		"trailing header":      append(slices.Clone(log), make([]byte, 11)...),
		"header only":          sha256Only,
		"two banks":            append(slices.Clone(both), event(4, 0x80000003, []byte("k"), uint16(0x0004), d20, uint16(algSHA256), d32)...),
		"SHA-1 only event":     append(slices.Clone(both), event(4, 0x80000003, nil, uint16(0x0004), d20)...),
		"more digests":         append(slices.Clone(sha256Only), event(4, 1, nil, uint16(algSHA256), d32, uint16(algSHA256), d32)...),
		"unlisted algorithm":   append(slices.Clone(sha256Only), event(4, 1, nil, uint16(0x000c), d32)...),
		"PCR 24":               append(slices.Clone(sha256Only), event(24, 1, nil, uint16(algSHA256), d32)...),
		"huge data":            append(slices.Clone(sha256Only), binary.LittleEndian.AppendUint32(event(4, 1, nil, uint16(algSHA256), d32)[:46], maxEventLen+1)...),
		"SHA-256 listed twice": append(header(algSHA256, 20, algSHA256, 32), event(4, 1, nil, uint16(algSHA256), d32)...),
		"algorithm 0 listed":   append(header(0, 4, algSHA256, 32), event(4, 1, nil, uint16(algSHA256), d32)[:14]...),
		"no SHA-256":           header(0x0004, 20),
		"17 algorithms":        header(slices.Repeat([]uint16{algSHA256, 32}, 17)...),
		"no algorithms":        header(),
		"locality":             append(slices.Clone(sha256Only), event(0, evNoAction, []byte("StartupLocality\x00\x03"), uint16(algSHA256), d32)...),
	}
	// Every cut of every case: truncated events, digests, headers.
	for name, b := range cases {
		for n := range len(b) + 1 {
			t.Run(fmt.Sprintf("%s/%d", name, n), func(t *testing.T) { checkEventLog(t, b[:n]) })
		}
	}
	// Every field of the fixture's first events damaged.
	for i := range min(len(log), 400) {
		b := slices.Clone(log)
		b[i] ^= 0xff
		checkEventLog(t, b)
	}
}

// The parse allocates its events once: nothing per event.
func TestParseEventLogAllocatesOnce(t *testing.T) {
	log := longLog(t)
	if n := testing.AllocsPerRun(20, func() { ParseEventLog(log) }); n != 1 {
		t.Fatalf("%v allocations", n)
	}
}

func FuzzParseEventLogAsReference(f *testing.F) {
	log, _ := fixture(f)
	f.Add(log)
	f.Add(append(header(0x0004, 20, algSHA256, 32), event(4, 0x80000003, []byte("k"), uint16(0x0004), bytes.Repeat([]byte{5}, 20), uint16(algSHA256), bytes.Repeat([]byte{7}, 32))...))
	f.Fuzz(checkEventLog)
}

// checkQuote holds the quote's parse to go-tpm's TPMS_ATTEST on b.
func checkQuote(t *testing.T, b []byte) {
	t.Helper()
	var got quoteFields
	err := got.parse(b)
	ref, refErr := tpm2.Unmarshal[tpm2.TPMSAttest](b)
	var info *tpm2.TPMSQuoteInfo
	if refErr == nil {
		info, refErr = ref.Attested.Quote()
	}
	if refErr == nil && len(b) != len(tpm2.Marshal(*ref)) {
		refErr = errors.New("trailing bytes")
	}
	if refErr == nil && (ref.Magic != tpm2.TPMGeneratedValue || ref.Type != tpm2.TPMSTAttestQuote || len(info.PCRSelect.PCRSelections) > 8) {
		refErr = errors.New("not a quote")
	}
	if refErr == nil {
		for _, s := range info.PCRSelect.PCRSelections {
			if s.Hash != tpm2.TPMAlgSHA256 {
				refErr = errors.New("another bank")
			}
		}
	}
	if (err == nil) != (refErr == nil) {
		t.Fatalf("parse error %v, go-tpm's %v", err, refErr)
	}
	if err != nil {
		return
	}
	var sel [maxSelect]byte
	for _, s := range info.PCRSelect.PCRSelections {
		for i, v := range s.PCRSelect {
			sel[i] |= v
		}
	}
	// TPMI_YES_NO is 0 or 1; go-tpm reads any other byte as yes, the
	// verifier (safely) as no.
	safe := b[4+2+2+len(ref.QualifiedSigner.Buffer)+2+len(ref.ExtraData.Buffer)+8+4+4] == 1
	want := Quote{Clock: ref.ClockInfo.Clock, ResetCount: ref.ClockInfo.ResetCount, RestartCount: ref.ClockInfo.RestartCount, Safe: safe}
	if !reflect.DeepEqual(got.q, want) || !bytes.Equal(got.extraData, ref.ExtraData.Buffer) || !bytes.Equal(got.pcrDigest, info.PCRDigest.Buffer) || got.selected != sel {
		t.Fatalf("read %+v, go-tpm %+v %+v", got, ref, info)
	}
}

func TestParseQuoteAsGoTPM(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	d := bytes.Repeat([]byte{1}, 32)
	var quotes [][]byte
	for _, pcrs := range []map[int][]byte{{}, {0: d}, {0: d, 7: d, 23: d}, {10: d}} {
		q, _, err := attesttest.Quote(key, []byte("nonce"), pcrs, 77)
		if err != nil {
			t.Fatal(err)
		}
		quotes = append(quotes, q)
	}
	// And one a TPM made.
	tpm, _ := guestTPM(t)
	ak, _ := createKey(t, tpm, akTemplates["ecc"])
	real, _, _ := quote(t, tpm, ak, []byte("nonce"), []uint{0, 1, 2, 3, 4, 5, 6, 7, 16})
	quotes = append(quotes, real)
	for _, q := range quotes {
		for n := range len(q) + 1 {
			checkQuote(t, q[:n])
		}
		checkQuote(t, append(slices.Clone(q), 0))
		for i := range q {
			b := slices.Clone(q)
			b[i] ^= 0xff
			checkQuote(t, b)
		}
	}
}

func FuzzParseQuoteAsGoTPM(f *testing.F) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	q, _, err := attesttest.Quote(key, []byte("nonce"), map[int][]byte{0: make([]byte, 32), 7: make([]byte, 32)}, 77)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(q)
	f.Fuzz(checkQuote)
}
