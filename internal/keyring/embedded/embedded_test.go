package embedded

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
)

func TestMain(m *testing.M) { os.Exit(storetest.Main(m)) }

// testKeyring is an Keyring keyring on a fresh store, and where its
// master key file is.
type testKeyring struct {
	*Keyring
	st  *store.Store
	key string
}

// newTestKeyring opens an Keyring keyring on a fresh store and, on
// cleanup, checks that every sealed secret still opens.
func newTestKeyring(t testing.TB) *testKeyring {
	t.Helper()
	st := storetest.Open(t)
	key := filepath.Join(t.TempDir(), "master.key")
	kr, err := Open(context.Background(), st, key)
	if err != nil {
		t.Fatalf("OpenEmbedded: %v", err)
	}
	t.Cleanup(func() {
		ids, err := kr.List(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range ids {
			if _, err := kr.Get(context.Background(), id); err != nil {
				t.Errorf("sealed secret %s does not open: %v", id, err)
			}
		}
	})
	return &testKeyring{Keyring: kr, st: st, key: key}
}

// blob and setBlob read and replace secret id's sealed blob in the store.
func (kr *testKeyring) blob(t testing.TB, id string) []byte {
	t.Helper()
	var k store.SealedKey
	if err := kr.st.View(context.Background(), func(tx *store.Tx) (err error) {
		k, err = tx.SealedKey(store.SealedSecret, id)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return k.Blob
}

func (kr *testKeyring) setBlob(t testing.TB, id string, blob []byte) {
	t.Helper()
	err := kr.st.Update(context.Background(), func(tx *store.Tx) error {
		err := tx.ResealKey(store.SealedKey{Kind: store.SealedSecret, Name: id, MasterKey: kr.MasterKeyID(), Blob: blob})
		if errors.Is(err, store.ErrNotFound) {
			err = tx.PutSealedKey(store.SealedKey{Kind: store.SealedSecret, Name: id, MasterKey: kr.MasterKeyID(), Blob: blob})
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func mustCreate(t testing.TB, kr keyring.Keyring, project string, payload []byte) string {
	t.Helper()
	id, err := kr.Create(context.Background(), project, "", payload)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	return id
}

func TestRoundTrip(t *testing.T) {
	ctx := context.Background()
	kr := newTestKeyring(t)
	payload, err := keyring.NewVTPMSecret()
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	id := mustCreate(t, kr, "tenant-a", payload)
	if !keyring.ValidID(id) {
		t.Fatalf("Create returned %q, not a canonical uuid", id)
	}
	got, err := kr.Get(ctx, id)
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	if got.ID != id || got.Project != "tenant-a" || !bytes.Equal(got.Payload, payload) {
		t.Errorf("Get = %v, want id %s, project tenant-a and the payload", got, id)
	}
	if got.Created.Before(before.Add(-time.Second)) || got.Created.After(time.Now().Add(time.Second)) {
		t.Errorf("Created = %v, want about %v", got.Created, before)
	}
	ids, err := kr.List(ctx)
	if err != nil || !slices.Equal(ids, []string{id}) {
		t.Errorf("List = %v, %v; want [%s]", ids, err, id)
	}

	// A second handle on the same store and key file (another replica)
	// sees the same secret.
	kr2, err := Open(ctx, kr.st, kr.key)
	if err != nil {
		t.Fatalf("reopening: %v", err)
	}
	got2, err := kr2.Get(ctx, id)
	if err != nil || !bytes.Equal(got2.Payload, payload) || !got2.Created.Equal(got.Created) {
		t.Errorf("after reopen Get = %v, %v; want the same secret", got2, err)
	}
}

func TestBlobIsBoundToID(t *testing.T) {
	ctx := context.Background()
	kr := newTestKeyring(t)
	a := mustCreate(t, kr, "p", []byte("secret of a"))
	b := mustCreate(t, kr, "p", []byte("secret of b"))

	blobA := kr.blob(t, a)
	// Over another secret's blob, and as a brand-new id.
	kr.setBlob(t, b, blobA)
	fresh, _ := keyring.NewID()
	kr.setBlob(t, fresh, blobA)
	for _, id := range []string{b, fresh} {
		s, err := kr.Get(ctx, id)
		if !errors.Is(err, keyring.ErrCorrupt) {
			t.Errorf("Get(%s) with %s's blob = %v, %v; want keyring.ErrCorrupt", id, a, s, err)
		}
	}
	if _, err := kr.Get(ctx, a); err != nil {
		t.Errorf("original still opens: %v", err)
	}
	kr.Delete(ctx, b)
	kr.Delete(ctx, fresh)
}

func TestBlobIsBoundToProject(t *testing.T) {
	kr := newTestKeyring(t)
	id := mustCreate(t, kr, "alpha", []byte("payload"))
	blob := kr.blob(t, id)
	i := bytes.Index(blob, []byte("alpha"))
	if i < 0 {
		t.Fatal("project not found in header")
	}
	copy(blob[i:], "omega") // same length: only authentication can catch it
	kr.setBlob(t, id, blob)
	if _, err := kr.Get(context.Background(), id); !errors.Is(err, keyring.ErrCorrupt) {
		t.Errorf("Get after swapping project = %v, want keyring.ErrCorrupt", err)
	}
	kr.Delete(context.Background(), id)
}

// Every single-byte change and every truncation must be refused cleanly:
// no panic, no payload.
func TestTamperedBlob(t *testing.T) {
	ctx := context.Background()
	kr := newTestKeyring(t)
	payload := []byte("tamper-evident payload")
	id := mustCreate(t, kr, "p", payload)
	orig := kr.blob(t, id)
	defer kr.setBlob(t, id, orig)

	for i := range orig {
		blob := bytes.Clone(orig)
		blob[i] ^= 0x01
		kr.setBlob(t, id, blob)
		s, err := kr.Get(ctx, id)
		if !errors.Is(err, keyring.ErrCorrupt) || s.Payload != nil {
			t.Fatalf("byte %d flipped: Get = %v, %v; want keyring.ErrCorrupt", i, s, err)
		}
	}
	for n := range len(orig) {
		kr.setBlob(t, id, orig[:n])
		if _, err := kr.Get(ctx, id); !errors.Is(err, keyring.ErrCorrupt) {
			t.Fatalf("truncated to %d bytes: Get = %v, want keyring.ErrCorrupt", n, err)
		}
	}
	kr.setBlob(t, id, append(bytes.Clone(orig), 0))
	if _, err := kr.Get(ctx, id); !errors.Is(err, keyring.ErrCorrupt) {
		t.Fatalf("a byte appended: Get = %v, want keyring.ErrCorrupt", err)
	}
}

// Another store's (another deployment's) master key file is refused, and
// so is a missing one once the store holds keys; a blob whose master key
// id was forged fails to open.
func TestWrongMasterKey(t *testing.T) {
	ctx := context.Background()
	kr := newTestKeyring(t)
	id := mustCreate(t, kr, "p", []byte("payload"))
	other := filepath.Join(t.TempDir(), "other.key")
	if _, err := NewMasterKeyFile(other); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, kr.st, other); !errors.Is(err, keyring.ErrMasterKeyMismatch) {
		t.Fatalf("OpenEmbedded with another key = %v, want keyring.ErrMasterKeyMismatch", err)
	} else if !strings.Contains(err.Error(), kr.MasterKeyID()) {
		t.Errorf("the error does not name the store's master key %s: %v", kr.MasterKeyID(), err)
	}
	if _, err := Open(ctx, kr.st, filepath.Join(t.TempDir(), "missing.key")); !errors.Is(err, keyring.ErrBadMasterKey) {
		t.Fatalf("OpenEmbedded without the key file = %v, want keyring.ErrBadMasterKey", err)
	}
	// A blob sealed under other but labelled with the store's key.
	mk, _ := ReadMasterKey(other)
	blob, _ := seal(mk.key, keyring.Secret{ID: id, Project: "p", Payload: []byte("payload"), Created: time.Now()})
	good := kr.blob(t, id)
	kr.setBlob(t, id, blob)
	if _, err := kr.Get(ctx, id); !errors.Is(err, keyring.ErrCorrupt) {
		t.Errorf("Get under another master key = %v, want keyring.ErrCorrupt", err)
	}
	kr.setBlob(t, id, good)
}

func TestMasterKeyFile(t *testing.T) {
	kr := newTestKeyring(t)
	fi, err := os.Stat(kr.key)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != masterKeySize || fi.Mode().Perm() != 0o600 {
		t.Errorf("master key: %d bytes, mode %#o; want 32 bytes, 0600", fi.Size(), fi.Mode().Perm())
	}
	key, _ := os.ReadFile(kr.key)
	if _, err := Open(context.Background(), kr.st, kr.key); err != nil {
		t.Fatalf("reopening: %v", err)
	}
	if again, _ := os.ReadFile(kr.key); !bytes.Equal(key, again) {
		t.Error("reopening replaced the master key")
	}
	if _, err := NewMasterKeyFile(kr.key); !errors.Is(err, fs.ErrExist) {
		t.Errorf("NewMasterKeyFile over an existing one = %v, want fs.ErrExist", err)
	}
	if strings.Contains(fmt.Sprintf("%v %+v %s", kr.keys[0], kr.keys[0], kr.keys[0]), string(key)) {
		t.Error("a MasterKey prints its key")
	}
}

func TestMasterKeyRefused(t *testing.T) {
	key := make([]byte, masterKeySize)
	tests := []struct {
		name  string
		setup func(t *testing.T, path string)
		want  error
	}{
		{"mode 0644", func(t *testing.T, path string) { writeKey(t, path, key, 0o644) }, keyring.ErrInsecureMode},
		{"mode 0640", func(t *testing.T, path string) { writeKey(t, path, key, 0o640) }, keyring.ErrInsecureMode},
		{"mode 0604", func(t *testing.T, path string) { writeKey(t, path, key, 0o604) }, keyring.ErrInsecureMode},
		{"31 bytes", func(t *testing.T, path string) { writeKey(t, path, key[:31], 0o600) }, keyring.ErrBadMasterKey},
		{"33 bytes", func(t *testing.T, path string) { writeKey(t, path, append(key, 0), 0o600) }, keyring.ErrBadMasterKey},
		{"empty", func(t *testing.T, path string) { writeKey(t, path, nil, 0o600) }, keyring.ErrBadMasterKey},
		{"symlink", func(t *testing.T, path string) {
			target := filepath.Join(t.TempDir(), "key")
			os.WriteFile(target, key, 0o600)
			if err := os.Symlink(target, path); err != nil {
				t.Fatal(err)
			}
		}, keyring.ErrInsecureMode},
		{"directory", func(t *testing.T, path string) { os.Mkdir(path, 0o700) }, keyring.ErrInsecureMode},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "master.key")
			tt.setup(t, path)
			kr, err := Open(context.Background(), storetest.Open(t), path)
			if !errors.Is(err, tt.want) {
				t.Fatalf("OpenEmbedded = %v, %v; want %v", kr, err, tt.want)
			}
			t.Logf("error: %v", err)
		})
	}
}

func writeKey(t *testing.T, path string, key []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, key, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // umask may have trimmed it
		t.Fatal(err)
	}
}

// Nothing of a payload reaches the store: not the SQLite files, not what
// a query of the table returns (PostgreSQL).
func TestNoPlaintextInStore(t *testing.T) {
	kr := newTestKeyring(t)
	var forbidden [][]byte
	for range 5 {
		p, err := keyring.NewVTPMSecret()
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := base64.StdEncoding.DecodeString(string(p))
		mustCreate(t, kr, "p", p)
		// The payload, the random bytes it encodes, and fragments of both
		// (a partial leak is a leak too).
		forbidden = append(forbidden, p, p[100:132], raw[:32], raw[200:232],
			[]byte(hex.EncodeToString(raw[:32])))
	}
	var all []byte
	kr.st.View(context.Background(), func(tx *store.Tx) error {
		keys, err := tx.SealedKeys()
		for _, k := range keys {
			all = append(all, k.Blob...)
		}
		return err
	})
	if len(all) == 0 {
		t.Fatal("no sealed blobs to check")
	}
	for _, n := range forbidden {
		if bytes.Contains(all, n) {
			t.Error("a sealed blob contains plaintext secret material")
		}
	}
	if dir := storeDir(t); dir != "" {
		assertNoneInDir(t, dir, forbidden)
	}
}

// storeDir is a directory holding the SQLite files storetest made for
// this test (the parent of all its temporary directories), "" on
// PostgreSQL.
func storeDir(t *testing.T) string {
	if os.Getenv("VTPMD_TEST_STORE") == "postgres" {
		return ""
	}
	return filepath.Dir(t.TempDir())
}

// assertNoneInDir fails if any file under dir contains any needle.
func assertNoneInDir(t testing.TB, dir string, needles [][]byte) {
	t.Helper()
	files := 0
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files++
		for _, n := range needles {
			if bytes.Contains(data, n) {
				t.Errorf("%s contains plaintext secret material", path)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files == 0 {
		t.Fatal("no files to check")
	}
}

func TestDelete(t *testing.T) {
	ctx := context.Background()
	kr := newTestKeyring(t)
	keep := mustCreate(t, kr, "p", []byte("keep"))
	gone := mustCreate(t, kr, "p", []byte("gone"))
	if err := kr.Delete(ctx, gone); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := kr.Get(ctx, gone); !errors.Is(err, keyring.ErrNotFound) {
		t.Errorf("Get after Delete = %v, want keyring.ErrNotFound", err)
	}
	if err := kr.Delete(ctx, gone); !errors.Is(err, keyring.ErrNotFound) {
		t.Errorf("second Delete = %v, want keyring.ErrNotFound", err)
	}
	never, _ := keyring.NewID()
	if _, err := kr.Get(ctx, never); !errors.Is(err, keyring.ErrNotFound) {
		t.Errorf("Get of unknown id = %v, want keyring.ErrNotFound", err)
	}
	if ids, _ := kr.List(ctx); !slices.Equal(ids, []string{keep}) {
		t.Errorf("List = %v, want [%s]", ids, keep)
	}
	kr.st.View(ctx, func(tx *store.Tx) error {
		if _, err := tx.SealedKey(store.SealedSecret, gone); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("the deleted secret's row: %v", err)
		}
		return nil
	})
}

func TestInvalidIDs(t *testing.T) {
	ctx := context.Background()
	kr := newTestKeyring(t)
	mustCreate(t, kr, "p", []byte("x"))
	valid, _ := keyring.NewID()
	before := kr.snapshot(t)
	for _, id := range []string{
		"",
		"../x",
		"../../../../etc/passwd",
		"master",
		"master.key",
		strings.ToUpper(valid),
		"{" + valid + "}",
		"urn:uuid:" + valid,
		strings.ReplaceAll(valid, "-", ""),
		valid + "\n",
		valid[:35] + "/",
		"../" + valid[3:],
		valid[:35] + "g",
		"00000000-0000-0000-0000-00000000000\x00",
	} {
		if _, err := kr.Get(ctx, id); !errors.Is(err, keyring.ErrInvalidID) {
			t.Errorf("Get(%q) = %v, want keyring.ErrInvalidID", id, err)
		}
		if err := kr.Delete(ctx, id); !errors.Is(err, keyring.ErrInvalidID) {
			t.Errorf("Delete(%q) = %v, want keyring.ErrInvalidID", id, err)
		}
	}
	if after := kr.snapshot(t); !slices.Equal(before, after) {
		t.Errorf("invalid ids changed the store:\nbefore %v\nafter  %v", before, after)
	}
}

// snapshot lists every sealed key in the store.
func (kr *testKeyring) snapshot(t testing.TB) []string {
	t.Helper()
	var out []string
	kr.st.View(context.Background(), func(tx *store.Tx) error {
		keys, err := tx.SealedKeys()
		for _, k := range keys {
			out = append(out, fmt.Sprintf("%s %s %s %x", k.Kind, k.Name, k.MasterKey, k.Blob))
		}
		return err
	})
	return out
}

func TestCreateValidation(t *testing.T) {
	ctx := context.Background()
	kr := newTestKeyring(t)
	before := kr.snapshot(t)
	for _, tt := range []struct {
		project string
		payload []byte
		want    error
	}{
		{"", []byte("x"), keyring.ErrInvalidProject},
		{strings.Repeat("p", keyring.MaxProjectLen+1), []byte("x"), keyring.ErrInvalidProject},
		{"bad\xffutf8", []byte("x"), keyring.ErrInvalidProject},
		{"p", nil, keyring.ErrInvalidPayload},
		{"p", []byte{}, keyring.ErrInvalidPayload},
		{"p", make([]byte, keyring.MaxPayloadLen+1), keyring.ErrInvalidPayload},
	} {
		if id, err := kr.Create(ctx, tt.project, "", tt.payload); !errors.Is(err, tt.want) {
			t.Errorf("Create(%q, %d bytes) = %q, %v; want %v", tt.project, len(tt.payload), id, err, tt.want)
		}
	}
	if after := kr.snapshot(t); !slices.Equal(before, after) {
		t.Errorf("refused Creates changed the store:\nbefore %v\nafter  %v", before, after)
	}
	// The limits themselves are accepted.
	id := mustCreate(t, kr, strings.Repeat("é", keyring.MaxProjectLen/2), make([]byte, keyring.MaxPayloadLen))
	if s, err := kr.Get(ctx, id); err != nil || len(s.Payload) != keyring.MaxPayloadLen {
		t.Errorf("Get of a maximal secret = %v, %v", s, err)
	}
}

func TestEmptyListIsNotNil(t *testing.T) {
	kr := newTestKeyring(t)
	ids, err := kr.List(context.Background())
	if err != nil || ids == nil || len(ids) != 0 {
		t.Errorf("List of an empty keyring = %#v, %v; want an empty slice", ids, err)
	}
}

func TestConcurrentUse(t *testing.T) {
	ctx := context.Background()
	kr := newTestKeyring(t)
	const workers, each = 32, 8
	var (
		mu   sync.Mutex
		want = map[string][]byte{}
		wg   sync.WaitGroup
	)
	errs := make(chan error, workers*each*3)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				payload := fmt.Appendf(nil, "payload %d/%d", w, i)
				id, err := kr.Create(ctx, fmt.Sprintf("project-%d", w), "", payload)
				if err != nil {
					errs <- err
					continue
				}
				mu.Lock()
				want[id] = payload
				mu.Unlock()
				if s, err := kr.Get(ctx, id); err != nil || !bytes.Equal(s.Payload, payload) {
					errs <- fmt.Errorf("Get(%s) right after Create = %v, %v", id, s, err)
				}
				if _, err := kr.List(ctx); err != nil {
					errs <- err
				}
				if i%4 == 3 { // delete some while others are being created
					if err := kr.Delete(ctx, id); err != nil {
						errs <- err
					}
					mu.Lock()
					delete(want, id)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	ids, err := kr.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != len(want) || len(want) != workers*each*3/4 {
		t.Fatalf("List has %d ids, want %d (= %d)", len(ids), len(want), workers*each*3/4)
	}
	for _, id := range ids {
		s, err := kr.Get(ctx, id)
		if err != nil || !bytes.Equal(s.Payload, want[id]) {
			t.Errorf("Get(%s) = %v, %v", id, s, err)
		}
	}
}

func TestCanceledContext(t *testing.T) {
	kr := newTestKeyring(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	id, _ := keyring.NewID()
	if _, err := kr.Create(ctx, "p", "", []byte("x")); !errors.Is(err, context.Canceled) {
		t.Errorf("Create = %v, want context.Canceled", err)
	}
	if _, err := kr.Get(ctx, id); !errors.Is(err, context.Canceled) {
		t.Errorf("Get = %v, want context.Canceled", err)
	}
	if err := kr.Delete(ctx, id); !errors.Is(err, context.Canceled) {
		t.Errorf("Delete = %v, want context.Canceled", err)
	}
	if _, err := kr.List(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("List = %v, want context.Canceled", err)
	}
	if got := kr.snapshot(t); len(got) != 0 {
		t.Errorf("the store holds %v", got)
	}
}

// TestStaged: a staged secret is given out once, never after it expires,
// goes with the expired ones, survives a master key rotation, and is no
// secret of the key manager's own.
func TestStaged(t *testing.T) {
	ctx := context.Background()
	kr := newTestKeyring(t)
	now := time.Now()
	stage := func(id string, until time.Time) {
		t.Helper()
		err := kr.st.Update(ctx, func(tx *store.Tx) error {
			return kr.Stage(tx, keyring.Secret{ID: id, Project: "p1", Payload: []byte("payload of " + id), Created: now}, until)
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	take := func(id string, at time.Time) (keyring.Secret, error) {
		var s keyring.Secret
		err := kr.st.Update(ctx, func(tx *store.Tx) (err error) { s, err = kr.TakeStaged(tx, id, at); return err })
		return s, err
	}
	a, b, c := "0f8fad5b-d9cb-469f-a165-70867728950e", "1f8fad5b-d9cb-469f-a165-70867728950e", "2f8fad5b-d9cb-469f-a165-70867728950e"
	stage(a, now.Add(time.Minute))
	stage(b, now.Add(time.Minute))
	stage(c, now.Add(time.Second))
	if ids, err := kr.List(ctx); err != nil || len(ids) != 0 {
		t.Fatalf("List = %v, %v: staged secrets are not the key manager's", ids, err)
	}
	next, err := NewMasterKeyFile(filepath.Join(t.TempDir(), "next.key"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kr.Rotate(ctx, next); err != nil {
		t.Fatal(err)
	}
	if s, err := take(a, now); err != nil || string(s.Payload) != "payload of "+a {
		t.Fatalf("TakeStaged = %v, %v", s, err)
	}
	if _, err := take(a, now); !errors.Is(err, keyring.ErrNotFound) {
		t.Fatalf("a second TakeStaged: %v, want ErrNotFound", err)
	}
	if _, err := take(b, now.Add(2*time.Minute)); !errors.Is(err, keyring.ErrNotFound) {
		t.Fatalf("TakeStaged after the expiry: %v, want ErrNotFound", err)
	}
	var dropped int
	if err := kr.st.Update(ctx, func(tx *store.Tx) (err error) {
		dropped, err = tx.DropExpiredStaged(now.Add(30 * time.Second))
		return err
	}); err != nil || dropped != 1 {
		t.Fatalf("DropExpiredStaged = %d, %v; want c alone", dropped, err)
	}
	if _, err := take(c, now); !errors.Is(err, keyring.ErrNotFound) {
		t.Fatalf("an expired and dropped secret: %v", err)
	}
	if _, err := take(b, now); err != nil {
		t.Fatalf("b before its expiry: %v", err)
	}
}
