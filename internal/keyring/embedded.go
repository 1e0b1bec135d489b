package keyring

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// Embedded is a key manager that needs only a local directory: the
// default of `vtpmd all-in-one` and of single-host deployments.
//
// Directory layout (the directory itself is mode 0700):
//
//	master.key       32 random bytes, mode 0600: the AES-256-GCM key
//	<uuid>.sealed    one per secret, mode 0600: see the format in seal.go
//	.tmp-*, .del-*   transient; left only by a crash, removed on open
//
// Losing master.key loses every secret; backing it up next to the
// directory defeats the encryption. Secrets are immutable once created, so
// each file is written exactly once. Embedded is safe for concurrent use by
// many goroutines; it holds no lock because every change is a single
// atomic link or rename in the directory.
type Embedded struct {
	dir string
	key []byte // read-only after OpenEmbedded
}

var _ Keyring = (*Embedded)(nil)

const (
	masterKeyName = "master.key"
	sealedSuffix  = ".sealed"
	// staleTemp is how old a .tmp- file must be before OpenEmbedded takes
	// it for a crash's leftover rather than another process's write.
	staleTemp = time.Minute
)

// OpenEmbedded opens the embedded key manager under dir, creating dir (mode
// 0700) and the master key (32 random bytes, mode 0600, created
// atomically) on first use. It refuses, with ErrInsecureMode, a directory
// or master key that group or others can access, and, with
// ErrBadMasterKey, a master key of the wrong size.
func OpenEmbedded(dir string) (*Embedded, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating keyring dir: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("checking keyring dir: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("%w: %s is not a directory", ErrInsecureMode, dir)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%w: keyring dir %s has mode %#o, want 0700", ErrInsecureMode, dir, perm)
	}
	key, err := loadMasterKey(dir)
	if err != nil {
		return nil, err
	}
	removeLeftovers(dir)
	return &Embedded{dir: dir, key: key}, nil
}

// loadMasterKey reads dir/master.key, creating it if absent. Two processes
// racing on first use both end up with the one key that was linked first.
func loadMasterKey(dir string) ([]byte, error) {
	path := filepath.Join(dir, masterKeyName)
	key, err := readMasterKey(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return key, err
	}
	// Without its key a directory of sealed secrets is still someone's
	// data; a fresh key would quietly make all of it unreadable.
	if n := countSealed(dir); n > 0 {
		return nil, fmt.Errorf("%w: %s is missing but %d sealed secrets exist", ErrBadMasterKey, path, n)
	}
	fresh := make([]byte, masterKeySize)
	defer clear(fresh)
	if _, err := rand.Read(fresh); err != nil {
		return nil, fmt.Errorf("generating master key: %w", err)
	}
	if err := createFile(dir, masterKeyName, fresh); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("creating master key: %w", err)
	}
	return readMasterKey(path)
}

func readMasterKey(path string) ([]byte, error) {
	key, mode, err := readSmallFile(path, masterKeySize)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if mode.Perm()&0o077 != 0 {
		clear(key)
		return nil, fmt.Errorf("%w: master key %s has mode %#o, want 0600", ErrInsecureMode, path, mode.Perm())
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadMasterKey, err)
	}
	if len(key) != masterKeySize {
		clear(key)
		return nil, fmt.Errorf("%w: %s is %d bytes, want %d", ErrBadMasterKey, path, len(key), masterKeySize)
	}
	return key, nil
}

func countSealed(dir string) int {
	entries, _ := os.ReadDir(dir)
	n := 0
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), sealedSuffix) {
			n++
		}
	}
	return n
}

// removeLeftovers deletes what a crash can leave behind: half-deleted
// secrets (shredded first) and temp files old enough not to be another
// process's write in progress. Failures only leave sealed, unlisted files.
func removeLeftovers(dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		switch {
		case strings.HasPrefix(e.Name(), delPrefix):
			shred(path)
			os.Remove(path)
		case strings.HasPrefix(e.Name(), tmpPrefix):
			if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > staleTemp {
				os.Remove(path)
			}
		}
	}
}

// Create seals payload under a fresh random UUID owned by project and
// returns the UUID.
func (e *Embedded) Create(ctx context.Context, project string, payload []byte) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if err := checkProject(project); err != nil {
		return "", err
	}
	if err := checkPayload(payload); err != nil {
		return "", err
	}
	created := time.Now().UTC().Round(0)
	// A UUID collision is astronomically unlikely, but createFile refuses
	// to overwrite, so one costs a retry rather than a lost secret.
	for range 3 {
		id, err := newID()
		if err != nil {
			return "", err
		}
		blob, err := seal(e.key, Secret{ID: id, Project: project, Payload: payload, Created: created})
		if err != nil {
			return "", fmt.Errorf("sealing secret: %w", err)
		}
		err = createFile(e.dir, id+sealedSuffix, blob)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("storing secret %s: %w", id, err)
		}
		return id, nil
	}
	return "", errors.New("storing secret: uuid collisions on every attempt")
}

// Get opens the secret id. A blob that does not authenticate gives
// ErrCorrupt, never a partial or garbled payload.
func (e *Embedded) Get(ctx context.Context, id string) (Secret, error) {
	if err := ctx.Err(); err != nil {
		return Secret{}, err
	}
	if !ValidID(id) {
		return Secret{}, fmt.Errorf("getting secret %q: %w", id, ErrInvalidID)
	}
	blob, _, err := readSmallFile(e.path(id), maxSealedLen)
	if errors.Is(err, fs.ErrNotExist) {
		return Secret{}, fmt.Errorf("getting secret %s: %w", id, ErrNotFound)
	}
	if errors.Is(err, errTooLarge) {
		return Secret{}, fmt.Errorf("getting secret %s: %w: %w", id, ErrCorrupt, err)
	}
	if err != nil {
		return Secret{}, fmt.Errorf("getting secret %s: %w", id, err)
	}
	s, err := unseal(e.key, id, blob)
	if err != nil {
		return Secret{}, fmt.Errorf("opening secret %s: %w", id, err)
	}
	return s, nil
}

// Delete destroys the secret id. It first renames the file away, so from
// that instant Get reports ErrNotFound, then overwrites (best effort, see
// shred) and unlinks it.
func (e *Embedded) Delete(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !ValidID(id) {
		return fmt.Errorf("deleting secret %q: %w", id, ErrInvalidID)
	}
	var suffix [8]byte
	rand.Read(suffix[:])
	doomed := filepath.Join(e.dir, fmt.Sprintf("%s%s-%x", delPrefix, id, suffix))
	if err := os.Rename(e.path(id), doomed); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("deleting secret %s: %w", id, ErrNotFound)
		}
		return fmt.Errorf("deleting secret %s: %w", id, err)
	}
	shred(doomed)
	if err := os.Remove(doomed); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("deleting secret %s: %w", id, err)
	}
	if err := atomicfile.SyncDir(e.dir); err != nil {
		return fmt.Errorf("deleting secret %s: %w", id, err)
	}
	return nil
}

// List returns the IDs of all secrets, sorted.
func (e *Embedded) List(ctx context.Context) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(e.dir)
	if err != nil {
		return nil, fmt.Errorf("listing secrets: %w", err)
	}
	ids := []string{}
	for _, ent := range entries {
		id, ok := strings.CutSuffix(ent.Name(), sealedSuffix)
		if ok && ValidID(id) && ent.Type().IsRegular() {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids, nil
}

func (e *Embedded) path(id string) string {
	return filepath.Join(e.dir, id+sealedSuffix)
}
