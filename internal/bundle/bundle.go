// Package bundle is the vTPM state bundle: the one form in which a vTPM's
// state leaves its host (a backup, a move). It carries the swtpm state
// files as they are at rest, still encrypted by swtpm with the vTPM's
// secret (never decrypted here), and what the control plane knows of the
// vTPM, sealed so that it opens only for that vTPM and any changed byte is
// detected.
//
// Format version 1, all integers big-endian:
//
//	magic      8 bytes  "vtpmbndl"
//	version    1 byte   1
//	hdrlen     4 bytes  length of header, at most MaxHeader
//	header     hdrlen   JSON (Header): instance, incarnation, secret
//	                    reference, generation, created time, source host
//	salt      32 bytes  random, per bundle
//	nonce     12 bytes  random
//	sealed     rest     AES-256-GCM of the body, with everything before it
//	                    (magic to nonce) as additional data
//
// The body, once opened:
//
//	metalen    4 bytes, meta (JSON: project, spec, endorsement keys)
//	count      2 bytes, then per file: namelen 2 bytes, name,
//	                    datalen 4 bytes, data
//
// The key is HKDF-SHA256 (RFC 5869) of the vTPM's key-manager secret
// (the payload that keys its swtpm state), with the bundle's salt and the
// info "vtpmd state bundle v1 <instance> <incarnation>": a bundle opens
// only with its vTPM's secret and only as that vTPM's, and the header,
// read in clear by whoever holds the bundle, cannot be changed without
// the seal failing. The per-bundle salt makes every bundle's key its own,
// so random nonces never repeat under one key.
//
// The header is readable without the secret (ReadHeader) so that a holder
// can refuse another vTPM's bundle, or an old generation, by its header
// before opening it; Open checks the header against the vTPM it is opened
// for and then authenticates it.
package bundle

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"regexp"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// Version is the format version Seal writes and Open reads.
const Version = 1

// Limits a bundle keeps to; a parser refuses anything larger as corrupt.
const (
	MaxHeader = 4 << 10  // the header's JSON
	MaxMeta   = 64 << 10 // the meta's JSON (EK certificates are ~1 KiB each)
	MaxFiles  = 16
	MaxFile   = 1 << 20 // one state file (a TPM 2.0's permall is ~10 KiB)
	MaxSize   = 3 << 20 // a whole bundle
)

const (
	magic    = "vtpmbndl"
	saltLen  = 32
	nonceLen = 12
	fixedLen = len(magic) + 1 + 4
)

// fileNameRE is what a state file may be called: a plain name, no path.
var fileNameRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$`)

// Header is what a bundle says of itself in clear, authenticated by its
// seal.
type Header struct {
	InstanceID  string `json:"instance_id"`
	Incarnation string `json:"incarnation"`
	// SecretRef is the key-manager secret whose payload keys both the
	// state and the bundle.
	SecretRef string `json:"secret_ref"`
	// Generation grows with every export of the vTPM (the control plane
	// hands it out): a bundle older than the newest recorded is stale.
	Generation int64     `json:"generation"`
	Created    time.Time `json:"created"`
	// SourceHost is the host whose agent exported it.
	SourceHost string `json:"source_host"`
	// Backend is the backend that exported it (swtpm, libvirt, ...).
	Backend string `json:"backend"`
}

// Bundle is a vTPM's state with what the control plane knows of it.
type Bundle struct {
	Header
	Project string
	Spec    spec.Spec
	EKs     []EK
	// Files are the state files as they are at rest, by name.
	Files []File
}

// EK is an endorsement key the vTPM's record holds.
type EK struct {
	Kind      string `json:"kind"`
	Handle    uint32 `json:"handle"`
	NVIndex   uint32 `json:"nv_index,omitempty"`
	PublicDER []byte `json:"public_der"`
	CertDER   []byte `json:"cert_der,omitempty"`
}

// File is one state file.
type File struct {
	Name string
	Data []byte
}

// File returns the data of the file called name, and whether there is one.
func (b *Bundle) File(name string) ([]byte, bool) {
	for _, f := range b.Files {
		if f.Name == name {
			return f.Data, true
		}
	}
	return nil, false
}

// meta is the body's JSON.
type meta struct {
	Project string       `json:"project"`
	Spec    api.VTPMSpec `json:"spec"`
	EKs     []EK         `json:"eks"`
}

// Seal encodes b and seals it with a key derived from secret, the payload
// of b's key-manager secret.
func Seal(b *Bundle, secret []byte) ([]byte, error) {
	if err := b.check(); err != nil {
		return nil, err
	}
	hdr, err := json.Marshal(b.Header)
	if err != nil {
		return nil, err
	}
	if len(hdr) > MaxHeader {
		return nil, fmt.Errorf("bundle header of %d bytes is over %d", len(hdr), MaxHeader)
	}
	m, err := json.Marshal(meta{Project: b.Project, Spec: spec.APISpec(b.Spec), EKs: b.EKs})
	if err != nil {
		return nil, err
	}
	if len(m) > MaxMeta {
		return nil, fmt.Errorf("bundle meta of %d bytes is over %d", len(m), MaxMeta)
	}
	size := 4 + len(m) + 2
	for _, f := range b.Files {
		size += 2 + len(f.Name) + 4 + len(f.Data)
	}
	body := make([]byte, 0, size)
	body = binary.BigEndian.AppendUint32(body, uint32(len(m)))
	body = append(body, m...)
	body = binary.BigEndian.AppendUint16(body, uint16(len(b.Files)))
	for _, f := range b.Files {
		body = binary.BigEndian.AppendUint16(body, uint16(len(f.Name)))
		body = append(body, f.Name...)
		body = binary.BigEndian.AppendUint32(body, uint32(len(f.Data)))
		body = append(body, f.Data...)
	}

	out := make([]byte, 0, fixedLen+len(hdr)+saltLen+nonceLen+len(body)+16)
	out = append(out, magic...)
	out = append(out, Version)
	out = binary.BigEndian.AppendUint32(out, uint32(len(hdr)))
	out = append(out, hdr...)
	salt := make([]byte, saltLen+nonceLen)
	if _, err := rand.Read(salt); err != nil {
		return nil, err
	}
	out = append(out, salt...)
	aead, err := newAEAD(secret, salt[:saltLen], b.InstanceID, b.Incarnation)
	if err != nil {
		return nil, err
	}
	out = aead.Seal(out, salt[saltLen:], body, bytes.Clone(out)) // additional data may not overlap dst
	if len(out) > MaxSize {
		return nil, fmt.Errorf("bundle of %d bytes is over %d", len(out), MaxSize)
	}
	return out, nil
}

// check refuses a bundle Seal would write but Open not read back.
func (b *Bundle) check() error {
	switch {
	case b.InstanceID == "" || b.Incarnation == "":
		return fmt.Errorf("a bundle names its vTPM (instance and incarnation)")
	}
	return checkFiles(b.Files)
}

// checkFiles refuses state files a bundle cannot hold.
func checkFiles(files []File) error {
	switch {
	case len(files) == 0 || len(files) > MaxFiles:
		return fmt.Errorf("a bundle holds 1 to %d state files, not %d", MaxFiles, len(files))
	}
	seen := map[string]bool{}
	for _, f := range files {
		switch {
		case !fileNameRE.MatchString(f.Name):
			return fmt.Errorf("state file name %q is not a plain file name", f.Name)
		case seen[f.Name]:
			return fmt.Errorf("state file %q twice", f.Name)
		case len(f.Data) > MaxFile:
			return fmt.Errorf("state file %s of %d bytes is over %d", f.Name, len(f.Data), MaxFile)
		}
		seen[f.Name] = true
	}
	return nil
}

// ReadHeader reads data's header without opening it (nothing in it is
// authenticated yet); ErrCorrupt if data is not a bundle of this version.
func ReadHeader(data []byte) (Header, error) {
	h, _, err := split(data)
	return h, err
}

// split parses data's frame: its header, and the offset of its salt.
func split(data []byte) (h Header, rest int, err error) {
	if len(data) > MaxSize {
		return h, 0, fmt.Errorf("%w: %d bytes, over %d", ErrCorrupt, len(data), MaxSize)
	}
	if len(data) < fixedLen || string(data[:len(magic)]) != magic {
		return h, 0, fmt.Errorf("%w: not a state bundle", ErrCorrupt)
	}
	if v := data[len(magic)]; v != Version {
		return h, 0, fmt.Errorf("%w: format version %d, this vtpmd reads %d", ErrCorrupt, v, Version)
	}
	n := binary.BigEndian.Uint32(data[len(magic)+1:])
	if n > MaxHeader || int(n) > len(data)-fixedLen-saltLen-nonceLen-16 {
		return h, 0, fmt.Errorf("%w: truncated", ErrCorrupt)
	}
	dec := json.NewDecoder(bytes.NewReader(data[fixedLen : fixedLen+int(n)]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil || dec.More() {
		return h, 0, fmt.Errorf("%w: header does not parse", ErrCorrupt)
	}
	return h, fixedLen + int(n), nil
}

// Open opens data as the bundle of the vTPM instanceID, incarnation,
// keyed by secret: ErrMismatch if its header names another vTPM,
// ErrCorrupt if it does not parse or its seal fails (a changed byte,
// another secret).
func Open(data, secret []byte, instanceID, incarnation string) (*Bundle, error) {
	h, off, err := split(data)
	if err != nil {
		return nil, err
	}
	if h.InstanceID != instanceID || h.Incarnation != incarnation {
		return nil, fmt.Errorf("%w: it is the bundle of instance %s (incarnation %s), not of %s (incarnation %s)",
			ErrMismatch, h.InstanceID, h.Incarnation, instanceID, incarnation)
	}
	aead, err := newAEAD(secret, data[off:off+saltLen], instanceID, incarnation)
	if err != nil {
		return nil, err
	}
	sealed := off + saltLen + nonceLen
	body, err := aead.Open(nil, data[off+saltLen:sealed], data[sealed:], data[:sealed])
	if err != nil {
		return nil, fmt.Errorf("%w: its seal does not verify with the vTPM's secret", ErrCorrupt)
	}
	b, err := parseBody(body)
	if err != nil {
		return nil, err
	}
	b.Header = h
	return b, nil
}

// parseBody reads an opened body. Sealed by Seal, it always parses; the
// checks guard against a writer that is not Seal.
func parseBody(body []byte) (*Bundle, error) {
	r := reader{buf: body}
	m := r.next(int(r.uint32()))
	if r.err == nil && len(m) > MaxMeta {
		r.err = fmt.Errorf("meta of %d bytes", len(m))
	}
	var md meta
	if r.err == nil {
		if err := json.Unmarshal(m, &md); err != nil {
			r.err = fmt.Errorf("meta does not parse")
		}
	}
	b := &Bundle{Project: md.Project, Spec: spec.FromAPI(md.Spec), EKs: md.EKs}
	count := int(r.uint16())
	if r.err == nil && (count == 0 || count > MaxFiles) {
		r.err = fmt.Errorf("%d state files", count)
	}
	for i := 0; i < count && r.err == nil; i++ {
		name := string(r.next(int(r.uint16())))
		data := r.next(int(r.uint32()))
		b.Files = append(b.Files, File{Name: name, Data: data})
	}
	if r.err == nil && len(r.buf) != 0 {
		r.err = fmt.Errorf("%d bytes after the last file", len(r.buf))
	}
	if r.err == nil {
		r.err = checkFiles(b.Files)
	}
	if r.err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, r.err)
	}
	return b, nil
}

// reader reads a body, remembering the first shortfall.
type reader struct {
	buf []byte
	err error
}

func (r *reader) next(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n > len(r.buf) {
		r.err = fmt.Errorf("truncated")
		return nil
	}
	out := r.buf[:n:n]
	r.buf = r.buf[n:]
	return out
}

func (r *reader) uint32() uint32 {
	b := r.next(4)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint32(b)
}

func (r *reader) uint16() uint16 {
	b := r.next(2)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint16(b)
}

// newAEAD is the bundle key's AES-256-GCM: HKDF-SHA256 of secret with
// salt, for the vTPM instanceID, incarnation.
func newAEAD(secret, salt []byte, instanceID, incarnation string) (cipher.AEAD, error) {
	if len(secret) == 0 {
		return nil, fmt.Errorf("no secret to seal the bundle with")
	}
	key, err := hkdf.Key(sha256.New, secret, salt, Info(instanceID, incarnation), 32)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// Info is the HKDF info string of a bundle key: the format version and the
// vTPM.
func Info(instanceID, incarnation string) string {
	return fmt.Sprintf("vtpmd state bundle v%d %s %s", Version, instanceID, incarnation)
}
