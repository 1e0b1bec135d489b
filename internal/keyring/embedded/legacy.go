package embedded

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/store"
)

// LegacySealedSuffix ends the name of a secret's file in the directory the
// embedded key manager kept before its secrets moved into the store
// (<data dir>/keys/<uuid>.sealed, beside master.key).
const LegacySealedSuffix = ".sealed"

// ImportDir copies the secrets sealed in the files of such a directory
// into the store, in tx, as they are: the blob format did not change, and
// they must be sealed under this Keyring's master key (the directory's
// master.key), which each is checked to open with. A secret already in the
// store is skipped. skip names secrets not to import (the CA keys, which
// become deployment keys). It returns how many it imported.
func (e *Keyring) ImportDir(tx *store.Tx, dir string, skip map[string]bool) (int, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	mk, err := e.sealingKey(tx)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, ent := range entries {
		id, ok := strings.CutSuffix(ent.Name(), LegacySealedSuffix)
		if !ok || !keyring.ValidID(id) || skip[id] {
			continue
		}
		blob, _, err := readSmallFile(filepath.Join(dir, ent.Name()), maxSealedLen)
		if err != nil {
			return 0, err
		}
		s, err := unseal(mk.key, id, blob)
		if err != nil {
			return 0, fmt.Errorf("importing secret %s: %w", id, err)
		}
		clear(s.Payload)
		err = tx.PutSealedKey(store.SealedKey{Kind: store.SealedSecret, Name: id, MasterKey: mk.ID(), Blob: blob})
		if errors.Is(err, store.ErrExists) {
			continue
		}
		if err != nil {
			return 0, err
		}
		n++
	}
	return n, nil
}

// OpenLegacy opens the secret id sealed in such a directory under this
// Keyring's master key.
func (e *Keyring) OpenLegacy(dir, id string) (keyring.Secret, error) {
	if !keyring.ValidID(id) {
		return keyring.Secret{}, fmt.Errorf("opening secret %q: %w", id, keyring.ErrInvalidID)
	}
	blob, _, err := readSmallFile(filepath.Join(dir, id+LegacySealedSuffix), maxSealedLen)
	if err != nil {
		return keyring.Secret{}, fmt.Errorf("opening secret %s: %w", id, err)
	}
	e.mu.Lock()
	mk := e.keys[0]
	e.mu.Unlock()
	s, err := unseal(mk.key, id, blob)
	if err != nil {
		return keyring.Secret{}, fmt.Errorf("opening secret %s: %w", id, err)
	}
	return s, nil
}
