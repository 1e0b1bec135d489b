// Package keyring is vtpmd's view of a key manager: the place where the
// per-vTPM secrets that encrypt swtpm state live, as Nova keeps them in
// Barbican.
//
// Keyring is the small interface the daemon consumes. The embedded
// package's is the provider that needs nothing but vtpmd's store and a
// master key file; the barbican package's keeps secrets in OpenStack's key
// manager, as Nova does (a Vault provider comes later). The master key also seals the
// deployment's own keys (its CAs, the verdict signing key), so that every
// server replica on one database shares them. A secret is addressed by a random UUID that
// doubles as the libvirt secret UUID, belongs to one project, and is never
// written to disk, logs or error messages in plaintext. Deleting a secret is
// crypto-shredding: whatever it encrypted becomes unreadable.
package keyring

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"time"
	"unicode/utf8"
)

// Limits that every provider enforces, so that a secret accepted by one is
// accepted by all.
const (
	// MaxProjectLen is the longest project name, in bytes.
	MaxProjectLen = 255
	// MaxPayloadLen is the largest payload, in bytes: ample for a vTPM
	// secret (512) or a CA key, and small enough for any key manager.
	MaxPayloadLen = 10000
)

// Secret is one stored secret.
//
// Formatting a Secret or *Secret with fmt (any verb, also inside slices,
// maps and exported struct fields) or logging it with slog never shows the
// payload, only its length. fmt cannot call methods through unexported
// struct fields, and encoding/json marshals Payload as usual: do not put a
// Secret in either.
type Secret struct {
	ID string // canonical lowercase UUID; doubles as the libvirt secret UUID
	// Project is the owning project (tenant); "" from a key manager that
	// does not say (Barbican: the identity that reads a secret is in its
	// project).
	Project string
	Payload []byte
	Created time.Time
}

// String describes s without its payload.
func (s Secret) String() string {
	return fmt.Sprintf("keyring.Secret{ID:%q, Project:%q, Payload:[redacted, %d bytes], Created:%s}",
		s.ID, s.Project, len(s.Payload), s.Created.Format(time.RFC3339))
}

// Format makes every fmt verb (%v, %+v, %#v, %s, %x, %d, …) print the
// redacted String, so no verb can reach the payload bytes.
func (s Secret) Format(f fmt.State, _ rune) {
	io.WriteString(f, s.String())
}

// LogValue makes slog handlers, including the JSON one, log the secret's
// metadata and never its payload.
func (s Secret) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("id", s.ID),
		slog.String("project", s.Project),
		slog.Int("payload_bytes", len(s.Payload)),
		slog.Time("created", s.Created),
	)
}

// Keyring is a key manager. Implementations: embedded and barbican;
// Vault later, so it stays small. Implementations are safe for concurrent
// use.
type Keyring interface {
	// Create stores payload as a new secret owned by project, named name
	// ("" for none; a vTPM's is VTPMSecretName), under a fresh random
	// UUID, which it returns. A key manager may choose the UUID itself
	// (Barbican does).
	Create(ctx context.Context, project, name string, payload []byte) (string, error)
	// Get returns the secret; ErrNotFound if it does not exist (or was
	// deleted).
	Get(ctx context.Context, id string) (Secret, error)
	// Delete destroys the secret (crypto-shredding for whatever it
	// encrypted); ErrNotFound if absent.
	Delete(ctx context.Context, id string) error
	// List returns the IDs of all secrets, sorted (for drift detection).
	List(ctx context.Context) ([]string, error)
}

// VTPMSecretName is the name of the secret of instanceID's vTPM, as Nova
// names it: a key manager that keeps names (Barbican) shows it, and finds
// a vTPM's secret by it.
func VTPMSecretName(instanceID string) string {
	return "vTPM secret for instance " + instanceID
}

// vtpmSecretLen is the number of random bytes in a vTPM secret; Nova uses
// 384 so that libvirt, swtpm and vtpmd secrets are interchangeable.
const vtpmSecretLen = 384

// NewVTPMSecret returns a new vTPM secret: 384 random bytes, base64
// (standard encoding), as Nova makes it. The result is 512 ASCII bytes and
// is what swtpm receives as its key passphrase.
func NewVTPMSecret() ([]byte, error) {
	raw := make([]byte, vtpmSecretLen)
	defer clear(raw)
	if _, err := rand.Read(raw); err != nil {
		return nil, fmt.Errorf("reading random bytes: %w", err)
	}
	out := make([]byte, base64.StdEncoding.EncodedLen(len(raw)))
	base64.StdEncoding.Encode(out, raw)
	return out, nil
}

// ValidID reports whether id is a canonical lowercase UUID, the only form
// of secret ID any provider accepts.
func ValidID(id string) bool {
	if len(id) != 36 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// NewID returns a random (version 4, RFC 9562) UUID in canonical form.
func NewID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("reading random bytes: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40 // version 4
	b[8] = b[8]&0x3f | 0x80 // variant 10
	var s [36]byte
	hex.Encode(s[0:8], b[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], b[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], b[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], b[8:10])
	s[23] = '-'
	hex.Encode(s[24:36], b[10:16])
	return string(s[:]), nil
}

// CheckProject and CheckPayload hold every provider to the same limits:
// ErrInvalidProject, ErrInvalidPayload.
func CheckProject(project string) error {
	if project == "" || len(project) > MaxProjectLen || !utf8.ValidString(project) {
		return fmt.Errorf("%w: want 1 to %d bytes of UTF-8", ErrInvalidProject, MaxProjectLen)
	}
	return nil
}

func CheckPayload(payload []byte) error {
	if len(payload) == 0 || len(payload) > MaxPayloadLen {
		return fmt.Errorf("%w: %d bytes, want 1 to %d", ErrInvalidPayload, len(payload), MaxPayloadLen)
	}
	return nil
}
