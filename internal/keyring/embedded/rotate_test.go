package embedded

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/store"
)

// A rotation re-seals every blob (secrets and deployment keys) under the
// new key in one transaction: everything opens after it, nothing is left
// under the old key. A replica still holding the old key fails clearly
// until its key file holds the new one, then works again without a
// restart; the old key alone opens nothing.
func TestRotate(t *testing.T) {
	ctx := context.Background()
	a := newTestKeyring(t)
	// Replica B: the same store, its own copy of the key file.
	bKey := filepath.Join(t.TempDir(), "master.key")
	data, _ := os.ReadFile(a.key)
	if err := os.WriteFile(bKey, data, 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := Open(ctx, a.st, bKey)
	if err != nil {
		t.Fatal(err)
	}
	payloads := map[string][]byte{}
	for _, p := range []string{"one", "two", "three"} {
		payloads[mustCreate(t, a, "p", []byte(p))] = []byte(p)
	}
	if err := a.st.Update(ctx, func(tx *store.Tx) error { return a.SealKey(tx, "ca", []byte("deployment key")) }); err != nil {
		t.Fatal(err)
	}
	old := a.MasterKeyID()

	nextFile := filepath.Join(t.TempDir(), "next.key")
	next, err := NewMasterKeyFile(nextFile)
	if err != nil {
		t.Fatal(err)
	}
	n, err := a.Rotate(ctx, next)
	if err != nil || n != 4 {
		t.Fatalf("Rotate = %d, %v; want 4 blobs re-sealed", n, err)
	}
	for _, k := range sealedKeys(t, a.st) {
		if k.MasterKey != next.ID() {
			t.Errorf("%s %s still sealed under %s", k.Kind, k.Name, k.MasterKey)
		}
	}
	checkOpens(t, a.Keyring, payloads)
	if again, err := a.Rotate(ctx, next); err != nil || again != 0 {
		t.Errorf("Rotate again to the same key = %d, %v; want nothing to do", again, err)
	}

	// B still holds only the old key: it fails clearly, and seals nothing.
	var id string
	for id = range payloads {
		break
	}
	if _, err := b.Get(ctx, id); !errors.Is(err, keyring.ErrMasterKeyMismatch) {
		t.Fatalf("Get on a replica with the old key = %v, want keyring.ErrMasterKeyMismatch", err)
	}
	if _, err := b.Create(ctx, "p", "", []byte("x")); !errors.Is(err, keyring.ErrMasterKeyMismatch) {
		t.Fatalf("Create on a replica with the old key = %v, want keyring.ErrMasterKeyMismatch", err)
	}
	if err := b.Check(ctx); !errors.Is(err, keyring.ErrMasterKeyMismatch) {
		t.Fatalf("Check on a replica with the old key = %v", err)
	}
	t.Logf("a replica with the old key: %v", b.Check(ctx))
	// Its key file replaced: it works again, as it runs.
	newData, _ := os.ReadFile(nextFile)
	if err := os.WriteFile(bKey, newData, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := b.Check(ctx); err != nil {
		t.Fatalf("Check after the new key file: %v", err)
	}
	checkOpens(t, b, payloads)
	made := mustCreate(t, b, "p", []byte("after"))
	if b.MasterKeyID() != next.ID() || old == next.ID() {
		t.Fatalf("B seals under %s, want %s", b.MasterKeyID(), next.ID())
	}
	if s, err := a.Get(ctx, made); err != nil || string(s.Payload) != "after" {
		t.Fatalf("A opens what B made after the rotation: %v", err)
	}
	// A new replica with the old key file is refused at start.
	if _, err := Open(ctx, a.st, filepath.Join(filepath.Dir(a.key), "master.key")); !errors.Is(err, keyring.ErrMasterKeyMismatch) {
		t.Fatalf("OpenEmbedded with the retired key = %v, want keyring.ErrMasterKeyMismatch", err)
	}
}

// A rotation that fails (here: a blob that no longer opens) changes
// nothing: every blob is still under the old key and opens with it.
func TestRotateIsAtomic(t *testing.T) {
	ctx := context.Background()
	kr := newTestKeyring(t)
	payloads := map[string][]byte{}
	for _, p := range []string{"one", "two"} {
		payloads[mustCreate(t, kr, "p", []byte(p))] = []byte(p)
	}
	bad := mustCreate(t, kr, "p", []byte("bad"))
	good := kr.blob(t, bad)
	broken := bytes.Clone(good)
	broken[len(broken)-1] ^= 1
	kr.setBlob(t, bad, broken)
	before := kr.snapshot(t)
	next, _ := NewMasterKeyFile(filepath.Join(t.TempDir(), "next.key"))
	if _, err := kr.Rotate(ctx, next); !errors.Is(err, keyring.ErrCorrupt) {
		t.Fatalf("Rotate over a corrupt blob = %v, want keyring.ErrCorrupt", err)
	}
	if after := kr.snapshot(t); !slices.Equal(before, after) {
		t.Fatal("a failed rotation changed the store")
	}
	kr.setBlob(t, bad, good)
	checkOpens(t, kr.Keyring, payloads)
}

func sealedKeys(t *testing.T, st *store.Store) []store.SealedKey {
	t.Helper()
	var keys []store.SealedKey
	if err := st.View(context.Background(), func(tx *store.Tx) (err error) {
		keys, err = tx.SealedKeys()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return keys
}

func checkOpens(t *testing.T, kr *Keyring, payloads map[string][]byte) {
	t.Helper()
	for id, want := range payloads {
		if s, err := kr.Get(context.Background(), id); err != nil || !bytes.Equal(s.Payload, want) {
			t.Errorf("Get(%s) = %v, %v", id, s, err)
		}
	}
	var got []byte
	err := kr.st.View(context.Background(), func(tx *store.Tx) (err error) {
		got, err = kr.OpenKey(tx, "ca")
		return err
	})
	if err != nil && !errors.Is(err, keyring.ErrNotFound) || err == nil && string(got) != "deployment key" {
		t.Errorf("OpenKey(ca) = %q, %v", got, err)
	}
}
