package embedded

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/vtpmd/vtpmd/internal/keyring"
)

// MasterKey is the deployment's master key: 32 random bytes (AES-256)
// that seal every key the store holds, read from a file that only its
// owner may read. Every server replica of one deployment reads the same
// key from its own copy of the file. Its ID, a hash, names it in the store
// and in messages; the key itself is never logged or printed.
type MasterKey struct {
	id  string
	key []byte
}

// ID names the key: "mk-" and 16 hex digits of a SHA-256 of it. It
// reveals nothing of the key.
func (m MasterKey) ID() string { return m.id }

// String shows only the ID, so a MasterKey cannot be printed by mistake.
func (m MasterKey) String() string { return "embedded.MasterKey{" + m.id + "}" }

func newMasterKey(key []byte) MasterKey {
	sum := sha256.Sum256(append([]byte("vtpmd master key id\x00"), key...))
	return MasterKey{id: "mk-" + hex.EncodeToString(sum[:8]), key: key}
}

// ReadMasterKey reads the master key file at path. It refuses, with
// keyring.ErrInsecureMode, a file that group or others can access, a symlink or
// not a regular file, and, with keyring.ErrBadMasterKey, one that is not exactly
// 32 bytes. A missing file's error wraps fs.ErrNotExist.
func ReadMasterKey(path string) (MasterKey, error) {
	key, mode, err := readSmallFile(path, masterKeySize)
	if errors.Is(err, fs.ErrNotExist) {
		return MasterKey{}, fmt.Errorf("master key %s: %w", path, err)
	}
	if mode.Perm()&0o077 != 0 {
		clear(key)
		return MasterKey{}, fmt.Errorf("%w: master key %s has mode %#o, want 0600", keyring.ErrInsecureMode, path, mode.Perm())
	}
	if err != nil {
		return MasterKey{}, fmt.Errorf("%w: %w", keyring.ErrBadMasterKey, err)
	}
	if len(key) != masterKeySize {
		clear(key)
		return MasterKey{}, fmt.Errorf("%w: %s is %d bytes, want %d", keyring.ErrBadMasterKey, path, len(key), masterKeySize)
	}
	return newMasterKey(key), nil
}

// NewMasterKeyFile writes a fresh master key to path (mode 0600, crash
// safe) and returns it. It never replaces a file: if path exists its error
// wraps fs.ErrExist.
func NewMasterKeyFile(path string) (MasterKey, error) {
	key := make([]byte, masterKeySize)
	if _, err := rand.Read(key); err != nil {
		return MasterKey{}, fmt.Errorf("generating master key: %w", err)
	}
	if err := createFile(filepath.Dir(path), filepath.Base(path), key); err != nil {
		return MasterKey{}, fmt.Errorf("creating master key %s: %w", path, err)
	}
	return newMasterKey(key), nil
}
