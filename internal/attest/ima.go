package attest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
)

// IMAPCR is the PCR the kernel's IMA extends (CONFIG_IMA_MEASURE_PCR_IDX).
const IMAPCR = 10

// IMAEntry is one measurement of the kernel's IMA log.
type IMAEntry struct {
	Index    int
	Template string // ima-ng, ima-sig, ima-buf, …
	// FileDigest is the measured file's digest, e.g. sha256 of its
	// content (the template's d-ng field), and Algorithm its hash.
	Algorithm  string
	FileDigest []byte
	Path       string // the n-ng field: a file path, or "boot_aggregate"
	// Violation: IMA could not measure reliably (a file open for write
	// while measured); the entry extends all ones.
	Violation bool
	// Extend is what the entry extended into the SHA-256 bank.
	Extend []byte

	size int // bytes of the log the entry takes
}

func (e IMAEntry) String() string {
	return fmt.Sprintf("%s (%s:%s)", e.Path, e.Algorithm, hex.EncodeToString(e.FileDigest[:min(len(e.FileDigest), 8)])+"…")
}

const maxIMAEntries = 1 << 20

// MaxIMALog bounds the IMA log a verifier keeps of one boot (about 60,000
// entries of ima-ng with SHA-256): a log that grows past it can no longer
// be judged whole.
const MaxIMALog = 8 << 20

// ParseIMALog reads the kernel's binary IMA log
// (/sys/kernel/security/ima/binary_runtime_measurements, little-endian):
// per entry the PCR, the SHA-1 template digest, the template name and the
// template data, whose fields are length-prefixed. Templates other than
// the legacy "ima" are hashed whole into each bank, which is what lets the
// SHA-256 bank be replayed from a log that records only SHA-1.
func ParseIMALog(log []byte) ([]IMAEntry, error) { return parseIMALog(log, 0, -1) }

// ParseIMAPrefix parses the first n entries of log and returns them with
// the bytes they take: what a verifier keeps of a log, or what an agent
// skips to send the rest. An error if log holds fewer than n entries.
func ParseIMAPrefix(log []byte, n int) ([]IMAEntry, []byte, error) {
	entries, err := parseIMALog(log, 0, n)
	if err != nil {
		return nil, nil, err
	}
	if len(entries) < n {
		return nil, nil, fmt.Errorf("IMA log: %d entries, not %d", len(entries), n)
	}
	return entries[:n], log[:sizeOf(entries[:n])], nil
}

// sizeOf is how many bytes of the log entries take.
func sizeOf(entries []IMAEntry) int {
	n := 0
	for _, e := range entries {
		n += e.size
	}
	return n
}

// parseIMALog parses log, whose first entry is entry first of the whole:
// its first limit entries, or all if limit < 0.
func parseIMALog(log []byte, first, limit int) ([]IMAEntry, error) {
	r := reader{b: log}
	var out []IMAEntry
	for r.left() > 0 && len(out) != limit {
		if first+len(out) >= maxIMAEntries {
			return nil, fmt.Errorf("IMA log: more than %d entries", maxIMAEntries)
		}
		start := r.off
		e := IMAEntry{Index: first + len(out)}
		pcr := r.u32()
		sha1 := r.bytes(20)
		nameLen := r.u32()
		if nameLen > 255 {
			return nil, fmt.Errorf("IMA log: entry %d claims a template name of %d bytes", e.Index, nameLen)
		}
		e.Template = string(r.bytes(int(nameLen)))
		dataLen := r.u32()
		if dataLen > maxEventLen {
			return nil, fmt.Errorf("IMA log: entry %d claims %d bytes", e.Index, dataLen)
		}
		data := r.bytes(int(dataLen))
		if r.err != nil {
			return nil, fmt.Errorf("IMA log: entry %d: %w", e.Index, r.err)
		}
		if pcr != IMAPCR {
			return nil, fmt.Errorf("IMA log: entry %d extends PCR %d; only PCR %d is supported", e.Index, pcr, IMAPCR)
		}
		if e.Template == "ima" {
			return nil, errors.New("IMA log: the legacy \"ima\" template is not supported; use ima-ng or ima-sig")
		}
		fields := reader{b: data}
		dng, nng := fields.bytes(int(fields.u32())), fields.bytes(int(fields.u32()))
		algo, digest, ok := bytes.Cut(dng, []byte(":\x00"))
		if fields.err != nil || !ok {
			return nil, fmt.Errorf("IMA log: entry %d: template %s has no d-ng and n-ng fields", e.Index, e.Template)
		}
		e.Algorithm, e.FileDigest, e.Path = string(algo), digest, string(bytes.TrimRight(nng, "\x00"))
		if e.Violation = bytes.Equal(sha1, make([]byte, 20)); e.Violation {
			e.Extend = bytes.Repeat([]byte{0xff}, sha256.Size)
		} else {
			sum := sha256.Sum256(data)
			e.Extend = sum[:]
		}
		e.size = r.off - start
		out = append(out, e)
	}
	return out, nil
}

// replayIMA is the value of PCR 10 after entries, from all zeros.
func replayIMA(entries []IMAEntry) []byte {
	v := make([]byte, sha256.Size)
	h := sha256.New()
	for _, e := range entries {
		h.Reset()
		h.Write(v)
		h.Write(e.Extend)
		v = h.Sum(v[:0])
	}
	return v
}

// ReplayIMA returns how many leading entries replay to quoted, the value
// of PCR 10 a quote vouches for. The kernel may measure more between the
// quote and the agent reading the log: those later entries are not
// judged yet. An error if no prefix of the log gives quoted.
func ReplayIMA(entries []IMAEntry, quoted []byte) (int, error) {
	return replayIMAFrom(make([]byte, sha256.Size), 0, entries, quoted)
}

// replayIMAFrom is ReplayIMA for entries that continue, from entry first,
// a log whose earlier entries replayed to from.
func replayIMAFrom(from []byte, first int, entries []IMAEntry, quoted []byte) (int, error) {
	v := bytes.Clone(from)
	if bytes.Equal(v, quoted) {
		return 0, nil
	}
	h := sha256.New()
	for i, e := range entries {
		h.Reset()
		h.Write(v)
		h.Write(e.Extend)
		v = h.Sum(v[:0])
		if bytes.Equal(v, quoted) {
			return i + 1, nil
		}
	}
	if first > 0 {
		return 0, fmt.Errorf("the IMA log (%d entries from entry %d) does not replay to the quoted PCR %d", len(entries), first, IMAPCR)
	}
	return 0, fmt.Errorf("the IMA log (%d entries) does not replay to the quoted PCR %d", len(entries), IMAPCR)
}
