// Package embedded is vtpmd's own key manager: secrets sealed under the
// deployment's master key (a file on each server replica) and kept in
// vtpmd's store, beside the deployment's own keys sealed the same way.
// Server side only: hosts' agents never hold the master key.
package embedded

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/store"
)

// Keyring is a key manager that needs nothing but vtpmd's own store and a
// master key file: the default of every deployment. Each secret is sealed
// (seal.go) under the deployment's master key and kept in the store's
// sealed_keys table, so every server replica sharing a PostgreSQL database
// reads the same secrets; the store never sees one in the clear. The same
// master key seals the deployment's own keys (SealKey, OpenKey).
//
// The store names the master key every blob is sealed under (its ID, never
// the key). An Keyring that meets one it does not hold reads its master
// key file again: after a rotation (Rotate) every replica picks up the new
// key as soon as the operator has installed the new file, without a
// restart; until then its requests fail with keyring.ErrMasterKeyMismatch. Nothing
// is ever sealed under a key the store no longer names.
//
// Losing the master key loses every secret; keep it apart from database
// backups, or the encryption protects nothing. Deleting a secret deletes
// its row (PostgreSQL may keep the dead row until it is vacuumed; it is
// sealed). Keyring is safe for concurrent use.
type Keyring struct {
	st   *store.Store
	path string // the master key file, read again when the store names another key

	mu   sync.Mutex
	keys []MasterKey // keys[0] seals; every one opens
}

var _ keyring.Keyring = (*Keyring)(nil)

// OpenEmbedded opens the embedded key manager on st with the master key in
// the file at masterKeyFile. On a store that holds no sealed key yet, a
// missing file is created with a fresh key (mode 0600); on one that does,
// a missing file or another key than the store's is refused with
// keyring.ErrBadMasterKey or keyring.ErrMasterKeyMismatch, never replaced: a fresh key
// would make every secret unreadable.
func Open(ctx context.Context, st *store.Store, masterKeyFile string) (*Keyring, error) {
	var current string
	if err := st.View(ctx, func(tx *store.Tx) (err error) {
		current, err = tx.MasterKeyID()
		return err
	}); err != nil {
		return nil, fmt.Errorf("reading the store's master key id: %w", err)
	}
	mk, err := ReadMasterKey(masterKeyFile)
	if errors.Is(err, fs.ErrNotExist) {
		if current != "" {
			return nil, fmt.Errorf("%w: %s is missing, and the store's keys are sealed under master key %s: install the deployment's master key file there",
				keyring.ErrBadMasterKey, masterKeyFile, current)
		}
		mk, err = NewMasterKeyFile(masterKeyFile)
		if errors.Is(err, fs.ErrExist) { // another process made it first
			mk, err = ReadMasterKey(masterKeyFile)
		}
	}
	if err != nil {
		return nil, err
	}
	if current != "" && current != mk.ID() {
		return nil, mismatch(current, mk, masterKeyFile)
	}
	return &Keyring{st: st, path: masterKeyFile, keys: []MasterKey{mk}}, nil
}

func mismatch(want string, have MasterKey, path string) error {
	return fmt.Errorf("%w: the store's keys are sealed under master key %s, the file %s holds %s: install the deployment's current master key there (see docs/deployment.md, rotating the master key)",
		keyring.ErrMasterKeyMismatch, want, path, have.ID())
}

// MasterKeyID is the ID of the master key this Keyring seals with.
func (e *Keyring) MasterKeyID() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.keys[0].ID()
}

// Check reports whether this Keyring can open the store's keys: it holds
// the master key the store names, or its master key file now does.
func (e *Keyring) Check(ctx context.Context) error {
	var id string
	if err := e.st.View(ctx, func(tx *store.Tx) (err error) {
		id, err = tx.MasterKeyID()
		return err
	}); err != nil {
		return err
	}
	if id == "" {
		return nil
	}
	_, err := e.key(id)
	return err
}

// key returns the held master key named id, reading the master key file
// again if none is: after a rotation, the new file makes it the key that
// seals. keyring.ErrMasterKeyMismatch if the file does not hold it either.
func (e *Keyring) key(id string) (MasterKey, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, k := range e.keys {
		if k.ID() == id {
			return k, nil
		}
	}
	mk, err := ReadMasterKey(e.path)
	if err != nil {
		return MasterKey{}, err
	}
	if mk.ID() != id {
		return MasterKey{}, mismatch(id, mk, e.path)
	}
	e.keys = slices.Insert(e.keys, 0, mk)
	return mk, nil
}

// sealingKey is the key to seal with in tx: the one the store names, which
// it starts naming with the first key sealed.
func (e *Keyring) sealingKey(tx *store.Tx) (MasterKey, error) {
	id, err := tx.MasterKeyID()
	if err != nil {
		return MasterKey{}, err
	}
	if id == "" {
		e.mu.Lock()
		mk := e.keys[0]
		e.mu.Unlock()
		return mk, tx.SetMasterKeyID(mk.ID())
	}
	return e.key(id)
}

// put seals s as the sealed key (kind, s.ID) in tx: under the master key
// this Keyring took last, in one statement that stores it only if the
// store names that key (nearly always); else under the one the store names
// (the first key sealed, or a rotation since).
func (e *Keyring) put(tx *store.Tx, kind string, s keyring.Secret) error {
	e.mu.Lock()
	mk := e.keys[0]
	e.mu.Unlock()
	blob, err := seal(mk.key, s)
	if err != nil {
		return fmt.Errorf("sealing %s: %w", s.ID, err)
	}
	k := store.SealedKey{Kind: kind, Name: s.ID, MasterKey: mk.ID(), Blob: blob}
	if stored, err := tx.PutSealedKeyIfCurrent(k); stored || err != nil {
		return err
	}
	if mk, err = e.sealingKey(tx); err != nil {
		return err
	}
	if k.MasterKey != mk.ID() {
		if k.Blob, err = seal(mk.key, s); err != nil {
			return fmt.Errorf("sealing %s: %w", s.ID, err)
		}
		k.MasterKey = mk.ID()
	}
	return tx.PutSealedKey(k)
}

// open reads and opens the sealed key (kind, name) in tx; keyring.ErrNotFound if
// there is none.
func (e *Keyring) open(tx *store.Tx, kind, name string) (keyring.Secret, error) {
	k, err := tx.SealedKey(kind, name)
	if errors.Is(err, store.ErrNotFound) {
		return keyring.Secret{}, keyring.ErrNotFound
	}
	if err != nil {
		return keyring.Secret{}, err
	}
	mk, err := e.key(k.MasterKey)
	if err != nil {
		return keyring.Secret{}, err
	}
	return unseal(mk.key, name, k.Blob)
}

// Create seals payload under a fresh random UUID owned by project and
// returns the UUID. The name is not kept: the store's records say what
// each secret is for.
func (e *Keyring) Create(ctx context.Context, project, _ string, payload []byte) (string, error) {
	if err := keyring.CheckProject(project); err != nil {
		return "", err
	}
	if err := keyring.CheckPayload(payload); err != nil {
		return "", err
	}
	created := time.Now().UTC().Round(0)
	// A UUID collision is astronomically unlikely, but PutSealedKey
	// refuses to overwrite, so one costs a retry rather than a lost secret.
	for range 3 {
		id, err := keyring.NewID()
		if err != nil {
			return "", err
		}
		err = e.st.Update(ctx, func(tx *store.Tx) error {
			return e.put(tx, store.SealedSecret, keyring.Secret{ID: id, Project: project, Payload: payload, Created: created})
		})
		if errors.Is(err, store.ErrExists) {
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
// keyring.ErrCorrupt, never a partial or garbled payload.
func (e *Keyring) Get(ctx context.Context, id string) (keyring.Secret, error) {
	if !keyring.ValidID(id) {
		return keyring.Secret{}, fmt.Errorf("getting secret %q: %w", id, keyring.ErrInvalidID)
	}
	var s keyring.Secret
	err := e.st.View(ctx, func(tx *store.Tx) (err error) {
		s, err = e.open(tx, store.SealedSecret, id)
		return err
	})
	if err != nil {
		return keyring.Secret{}, fmt.Errorf("getting secret %s: %w", id, err)
	}
	return s, nil
}

// GetIn opens the secret id in tx, as Get does in a transaction of its
// own: for a caller that decides in tx whether to give it out (the key
// broker), so that a delete cannot come between the decision and the
// read.
func (e *Keyring) GetIn(tx *store.Tx, id string) (keyring.Secret, error) {
	if !keyring.ValidID(id) {
		return keyring.Secret{}, fmt.Errorf("getting secret %q: %w", id, keyring.ErrInvalidID)
	}
	s, err := e.open(tx, store.SealedSecret, id)
	if err != nil {
		return keyring.Secret{}, fmt.Errorf("getting secret %s: %w", id, err)
	}
	return s, nil
}

// Delete destroys the secret id.
func (e *Keyring) Delete(ctx context.Context, id string) error {
	if !keyring.ValidID(id) {
		return fmt.Errorf("deleting secret %q: %w", id, keyring.ErrInvalidID)
	}
	err := e.st.Update(ctx, func(tx *store.Tx) error { return tx.DeleteSealedKey(store.SealedSecret, id) })
	if errors.Is(err, store.ErrNotFound) {
		err = keyring.ErrNotFound
	}
	if err != nil {
		return fmt.Errorf("deleting secret %s: %w", id, err)
	}
	return nil
}

// List returns the IDs of all secrets, sorted.
func (e *Keyring) List(ctx context.Context) ([]string, error) {
	var ids []string
	err := e.st.View(ctx, func(tx *store.Tx) (err error) {
		ids, err = tx.SealedKeyNames(store.SealedSecret)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listing secrets: %w", err)
	}
	return ids, nil
}

// SystemProject is the project of the deployment's own keys (SealKey).
const SystemProject = "vtpmd-system"

// SealKey seals payload, one of the deployment's own keys, under the
// master key as the key named name, in tx: so several keys are made in one
// transaction. ErrExists (the store's) if name is taken.
func (e *Keyring) SealKey(tx *store.Tx, name string, payload []byte) error {
	return e.put(tx, store.SealedDeployment, keyring.Secret{ID: name, Project: SystemProject, Payload: payload, Created: time.Now().UTC().Round(0)})
}

// OpenKey opens the deployment's key named name in tx; keyring.ErrNotFound if
// there is none.
func (e *Keyring) OpenKey(tx *store.Tx, name string) ([]byte, error) {
	s, err := e.open(tx, store.SealedDeployment, name)
	if err != nil {
		return nil, fmt.Errorf("opening the deployment key %s: %w", name, err)
	}
	return s.Payload, nil
}

// Stage seals s, a vTPM secret its owner's request read from a key manager
// vtpmd cannot read alone (keyring.CallerScoped), for the vTPM's host's
// agent, in tx: TakeStaged gives it out once, until until. A secret staged
// before under s.ID is replaced.
func (e *Keyring) Stage(tx *store.Tx, s keyring.Secret, until time.Time) error {
	if err := tx.DropStaged(s.ID); err != nil {
		return err
	}
	if err := e.put(tx, store.SealedStaged, s); err != nil {
		return err
	}
	return tx.SetStagedExpiry(s.ID, until)
}

// TakeStaged opens and deletes the secret staged as id in tx;
// keyring.ErrNotFound if none is, or it expired by now.
func (e *Keyring) TakeStaged(tx *store.Tx, id string, now time.Time) (keyring.Secret, error) {
	until, err := tx.StagedExpiry(id)
	if errors.Is(err, store.ErrNotFound) {
		return keyring.Secret{}, keyring.ErrNotFound
	}
	if err != nil {
		return keyring.Secret{}, err
	}
	s, err := e.open(tx, store.SealedStaged, id)
	if err != nil {
		return keyring.Secret{}, err
	}
	if err := tx.DropStaged(id); err != nil {
		return keyring.Secret{}, err
	}
	if !now.Before(until) {
		return keyring.Secret{}, keyring.ErrNotFound
	}
	return s, nil
}

// Rotate re-seals every key in the store (the embedded key manager's
// secrets and the deployment's own keys) under next, in one transaction,
// and makes next the key this Keyring seals with. Blobs already under
// next are left as they are, so a Rotate interrupted by a failure can be
// run again. It returns how many blobs it re-sealed. Other replicas keep
// their old key until their master key file holds next (see Keyring).
func (e *Keyring) Rotate(ctx context.Context, next MasterKey) (int, error) {
	n := 0
	err := e.st.Update(ctx, func(tx *store.Tx) error {
		n = 0
		keys, err := tx.SealedKeys()
		if err != nil {
			return err
		}
		for _, k := range keys {
			if k.MasterKey == next.ID() {
				continue
			}
			mk, err := e.key(k.MasterKey)
			if err != nil {
				return err
			}
			s, err := unseal(mk.key, k.Name, k.Blob)
			if err != nil {
				return fmt.Errorf("opening %s %s: %w", k.Kind, k.Name, err)
			}
			blob, err := seal(next.key, s)
			clear(s.Payload)
			if err != nil {
				return err
			}
			if err := tx.ResealKey(store.SealedKey{Kind: k.Kind, Name: k.Name, MasterKey: next.ID(), Blob: blob}); err != nil {
				return err
			}
			n++
		}
		return tx.SetMasterKeyID(next.ID())
	})
	if err != nil {
		return 0, fmt.Errorf("rotating the master key: %w", err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.keys = slices.Insert(e.keys, 0, next)
	return n, nil
}
