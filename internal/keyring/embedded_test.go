package keyring

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// newTestKeyring opens an Embedded keyring in a fresh directory and, on
// cleanup, checks the invariants every test must leave intact: no
// transient files, 0700 directory, 0600 files, and every sealed secret
// still opens.
func newTestKeyring(t testing.TB) (*Embedded, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "keyring")
	kr, err := OpenEmbedded(dir)
	if err != nil {
		t.Fatalf("OpenEmbedded: %v", err)
	}
	t.Cleanup(func() { checkKeyringDir(t, kr, dir) })
	return kr, dir
}

func checkKeyringDir(t testing.TB, kr *Embedded, dir string) {
	t.Helper()
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatalf("stat keyring dir: %v", err)
	}
	if perm := fi.Mode().Perm(); perm != 0o700 {
		t.Errorf("keyring dir mode %#o, want 0700", perm)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("reading keyring dir: %v", err)
	}
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, tmpPrefix) || strings.HasPrefix(name, delPrefix) {
			t.Errorf("transient file %s left behind", name)
		}
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		if perm := info.Mode().Perm(); perm != 0o600 {
			t.Errorf("%s has mode %#o, want 0600", name, perm)
		}
		if id, ok := strings.CutSuffix(name, sealedSuffix); ok {
			if _, err := kr.Get(context.Background(), id); err != nil {
				t.Errorf("sealed secret %s does not open: %v", id, err)
			}
		}
	}
}

func mustCreate(t testing.TB, kr Keyring, project string, payload []byte) string {
	t.Helper()
	id, err := kr.Create(context.Background(), project, payload)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	return id
}

func TestRoundTrip(t *testing.T) {
	ctx := context.Background()
	kr, _ := newTestKeyring(t)
	payload, err := NewVTPMSecret()
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	id := mustCreate(t, kr, "tenant-a", payload)
	if !ValidID(id) {
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

	// A second handle on the same directory sees the same secret.
	kr2, err := OpenEmbedded(kr.dir)
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
	kr, _ := newTestKeyring(t)
	a := mustCreate(t, kr, "p", []byte("secret of a"))
	b := mustCreate(t, kr, "p", []byte("secret of b"))

	blobA, err := os.ReadFile(kr.path(a))
	if err != nil {
		t.Fatal(err)
	}
	// Over another secret's file, and as a brand-new id.
	if err := os.WriteFile(kr.path(b), blobA, 0o600); err != nil {
		t.Fatal(err)
	}
	fresh, _ := newID()
	if err := os.WriteFile(kr.path(fresh), blobA, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{b, fresh} {
		s, err := kr.Get(ctx, id)
		if !errors.Is(err, ErrCorrupt) {
			t.Errorf("Get(%s) with %s's blob = %v, %v; want ErrCorrupt", id, a, s, err)
		}
	}
	if _, err := kr.Get(ctx, a); err != nil {
		t.Errorf("original still opens: %v", err)
	}
	os.Remove(kr.path(b))
	os.Remove(kr.path(fresh))
}

func TestBlobIsBoundToProject(t *testing.T) {
	kr, _ := newTestKeyring(t)
	id := mustCreate(t, kr, "alpha", []byte("payload"))
	blob, err := os.ReadFile(kr.path(id))
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(blob, []byte("alpha"))
	if i < 0 {
		t.Fatal("project not found in header")
	}
	copy(blob[i:], "omega") // same length: only authentication can catch it
	if err := os.WriteFile(kr.path(id), blob, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := kr.Get(context.Background(), id); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Get after swapping project = %v, want ErrCorrupt", err)
	}
	os.Remove(kr.path(id))
}

// Every single-byte change and every truncation must be refused cleanly:
// no panic, no payload.
func TestTamperedBlob(t *testing.T) {
	ctx := context.Background()
	kr, _ := newTestKeyring(t)
	payload := []byte("tamper-evident payload")
	id := mustCreate(t, kr, "p", payload)
	orig, err := os.ReadFile(kr.path(id))
	if err != nil {
		t.Fatal(err)
	}
	defer os.WriteFile(kr.path(id), orig, 0o600)

	for i := range orig {
		blob := bytes.Clone(orig)
		blob[i] ^= 0x01
		if err := os.WriteFile(kr.path(id), blob, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := kr.Get(ctx, id)
		if !errors.Is(err, ErrCorrupt) || s.Payload != nil {
			t.Fatalf("byte %d flipped: Get = %v, %v; want ErrCorrupt", i, s, err)
		}
	}
	for n := range len(orig) {
		if err := os.WriteFile(kr.path(id), orig[:n], 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := kr.Get(ctx, id); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("truncated to %d bytes: Get = %v, want ErrCorrupt", n, err)
		}
	}
	for _, extra := range []int{1, maxSealedLen} {
		if err := os.WriteFile(kr.path(id), append(bytes.Clone(orig), make([]byte, extra)...), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := kr.Get(ctx, id); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("%d bytes appended: Get = %v, want ErrCorrupt", extra, err)
		}
	}
}

func TestWrongMasterKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "kr")
	kr, err := OpenEmbedded(dir)
	if err != nil {
		t.Fatal(err)
	}
	id := mustCreate(t, kr, "p", []byte("payload"))
	other := make([]byte, masterKeySize)
	rand.Read(other)
	if err := os.WriteFile(filepath.Join(dir, masterKeyName), other, 0o600); err != nil {
		t.Fatal(err)
	}
	kr2, err := OpenEmbedded(dir)
	if err != nil {
		t.Fatalf("OpenEmbedded with another valid key: %v", err)
	}
	if _, err := kr2.Get(context.Background(), id); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Get under another master key = %v, want ErrCorrupt", err)
	}
}

func TestMasterKeyFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "kr")
	if _, err := OpenEmbedded(dir); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, masterKeyName)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != masterKeySize || fi.Mode().Perm() != 0o600 {
		t.Errorf("master key: %d bytes, mode %#o; want 32 bytes, 0600", fi.Size(), fi.Mode().Perm())
	}
	key, _ := os.ReadFile(path)
	if _, err := OpenEmbedded(dir); err != nil {
		t.Fatalf("reopening: %v", err)
	}
	if again, _ := os.ReadFile(path); !bytes.Equal(key, again) {
		t.Error("reopening replaced the master key")
	}
}

func TestMasterKeyRefused(t *testing.T) {
	key := make([]byte, masterKeySize)
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string)
		want  error
	}{
		{"mode 0644", func(t *testing.T, dir string) { writeKey(t, dir, key, 0o644) }, ErrInsecureMode},
		{"mode 0640", func(t *testing.T, dir string) { writeKey(t, dir, key, 0o640) }, ErrInsecureMode},
		{"mode 0604", func(t *testing.T, dir string) { writeKey(t, dir, key, 0o604) }, ErrInsecureMode},
		{"31 bytes", func(t *testing.T, dir string) { writeKey(t, dir, key[:31], 0o600) }, ErrBadMasterKey},
		{"33 bytes", func(t *testing.T, dir string) { writeKey(t, dir, append(key, 0), 0o600) }, ErrBadMasterKey},
		{"empty", func(t *testing.T, dir string) { writeKey(t, dir, nil, 0o600) }, ErrBadMasterKey},
		{"symlink", func(t *testing.T, dir string) {
			target := filepath.Join(t.TempDir(), "key")
			os.WriteFile(target, key, 0o600)
			if err := os.Symlink(target, filepath.Join(dir, masterKeyName)); err != nil {
				t.Fatal(err)
			}
		}, ErrInsecureMode},
		{"directory", func(t *testing.T, dir string) { os.Mkdir(filepath.Join(dir, masterKeyName), 0o700) }, ErrInsecureMode},
		{"dir mode 0755", func(t *testing.T, dir string) { os.Chmod(dir, 0o755) }, ErrInsecureMode},
		{"missing with secrets", func(t *testing.T, dir string) {
			id, _ := newID()
			os.WriteFile(filepath.Join(dir, id+sealedSuffix), []byte("x"), 0o600)
		}, ErrBadMasterKey},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "kr")
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			tt.setup(t, dir)
			kr, err := OpenEmbedded(dir)
			if !errors.Is(err, tt.want) {
				t.Fatalf("OpenEmbedded = %v, %v; want %v", kr, err, tt.want)
			}
			t.Logf("error: %v", err)
		})
	}
}

func writeKey(t *testing.T, dir string, key []byte, mode os.FileMode) {
	t.Helper()
	path := filepath.Join(dir, masterKeyName)
	if err := os.WriteFile(path, key, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // umask may have trimmed it
		t.Fatal(err)
	}
}

func TestNoPlaintextOnDisk(t *testing.T) {
	kr, dir := newTestKeyring(t)
	var forbidden [][]byte
	for range 5 {
		p, err := NewVTPMSecret()
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
	assertNoneInDir(t, dir, forbidden)
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
	kr, dir := newTestKeyring(t)
	keep := mustCreate(t, kr, "p", []byte("keep"))
	gone := mustCreate(t, kr, "p", []byte("gone"))
	if err := kr.Delete(ctx, gone); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := kr.Get(ctx, gone); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete = %v, want ErrNotFound", err)
	}
	if err := kr.Delete(ctx, gone); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Delete = %v, want ErrNotFound", err)
	}
	never, _ := newID()
	if _, err := kr.Get(ctx, never); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get of unknown id = %v, want ErrNotFound", err)
	}
	if ids, _ := kr.List(ctx); !slices.Equal(ids, []string{keep}) {
		t.Errorf("List = %v, want [%s]", ids, keep)
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), gone) {
			t.Errorf("%s left in the directory after Delete", e.Name())
		}
	}
}

func TestInvalidIDs(t *testing.T) {
	ctx := context.Background()
	kr, dir := newTestKeyring(t)
	mustCreate(t, kr, "p", []byte("x"))
	valid, _ := newID()
	before := snapshotDir(t, filepath.Dir(dir))
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
		if _, err := kr.Get(ctx, id); !errors.Is(err, ErrInvalidID) {
			t.Errorf("Get(%q) = %v, want ErrInvalidID", id, err)
		}
		if err := kr.Delete(ctx, id); !errors.Is(err, ErrInvalidID) {
			t.Errorf("Delete(%q) = %v, want ErrInvalidID", id, err)
		}
	}
	if after := snapshotDir(t, filepath.Dir(dir)); !slices.Equal(before, after) {
		t.Errorf("invalid ids changed the filesystem:\nbefore %v\nafter  %v", before, after)
	}
}

// snapshotDir lists every path under root with its size and mtime.
func snapshotDir(t testing.TB, root string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		out = append(out, fmt.Sprintf("%s %d %d", path, info.Size(), info.ModTime().UnixNano()))
		return nil
	})
	return out
}

func TestCreateValidation(t *testing.T) {
	ctx := context.Background()
	kr, dir := newTestKeyring(t)
	before := snapshotDir(t, dir)
	for _, tt := range []struct {
		project string
		payload []byte
		want    error
	}{
		{"", []byte("x"), ErrInvalidProject},
		{strings.Repeat("p", MaxProjectLen+1), []byte("x"), ErrInvalidProject},
		{"bad\xffutf8", []byte("x"), ErrInvalidProject},
		{"p", nil, ErrInvalidPayload},
		{"p", []byte{}, ErrInvalidPayload},
		{"p", make([]byte, MaxPayloadLen+1), ErrInvalidPayload},
	} {
		if id, err := kr.Create(ctx, tt.project, tt.payload); !errors.Is(err, tt.want) {
			t.Errorf("Create(%q, %d bytes) = %q, %v; want %v", tt.project, len(tt.payload), id, err, tt.want)
		}
	}
	if after := snapshotDir(t, dir); !slices.Equal(before, after) {
		t.Errorf("refused Creates changed the directory:\nbefore %v\nafter  %v", before, after)
	}
	// The limits themselves are accepted.
	id := mustCreate(t, kr, strings.Repeat("é", MaxProjectLen/2), make([]byte, MaxPayloadLen))
	if s, err := kr.Get(ctx, id); err != nil || len(s.Payload) != MaxPayloadLen {
		t.Errorf("Get of a maximal secret = %v, %v", s, err)
	}
}

func TestListIgnoresOtherFiles(t *testing.T) {
	ctx := context.Background()
	kr, dir := newTestKeyring(t)
	var want []string
	for range 10 {
		want = append(want, mustCreate(t, kr, "p", []byte("x")))
	}
	slices.Sort(want)
	junk := []string{"README", strings.ToUpper(want[0]) + sealedSuffix, "not-a-uuid" + sealedSuffix, want[0]}
	for _, name := range junk {
		os.WriteFile(filepath.Join(dir, name), []byte("junk"), 0o600)
	}
	got, err := kr.List(ctx)
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("List = %v, %v; want %v", got, err, want)
	}
	for _, name := range junk {
		os.Remove(filepath.Join(dir, name))
	}
}

func TestEmptyListIsNotNil(t *testing.T) {
	kr, _ := newTestKeyring(t)
	ids, err := kr.List(context.Background())
	if err != nil || ids == nil || len(ids) != 0 {
		t.Errorf("List of an empty keyring = %#v, %v; want an empty slice", ids, err)
	}
}

func TestCrashLeftoversRemovedOnOpen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "kr")
	kr, err := OpenEmbedded(dir)
	if err != nil {
		t.Fatal(err)
	}
	id := mustCreate(t, kr, "p", []byte("half-deleted"))
	// A crash inside Delete after the rename, and inside Create before the
	// link; plus a temp file another process is writing right now.
	halfDeleted := filepath.Join(dir, delPrefix+id+"-0011223344556677")
	if err := os.Rename(kr.path(id), halfDeleted); err != nil {
		t.Fatal(err)
	}
	staleTmp := filepath.Join(dir, tmpPrefix+"123")
	freshTmp := filepath.Join(dir, tmpPrefix+"456")
	os.WriteFile(staleTmp, []byte("sealed"), 0o600)
	os.WriteFile(freshTmp, []byte("sealed"), 0o600)
	old := time.Now().Add(-time.Hour)
	os.Chtimes(staleTmp, old, old)

	if ids, _ := kr.List(context.Background()); len(ids) != 0 {
		t.Errorf("List shows transient files: %v", ids)
	}
	if _, err := OpenEmbedded(dir); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]bool{halfDeleted: false, staleTmp: false, freshTmp: true} {
		if _, err := os.Stat(path); (err == nil) != want {
			t.Errorf("%s exists = %v after reopen, want %v", filepath.Base(path), err == nil, want)
		}
	}
}

func TestConcurrentUse(t *testing.T) {
	ctx := context.Background()
	kr, _ := newTestKeyring(t)
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
				id, err := kr.Create(ctx, fmt.Sprintf("project-%d", w), payload)
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
	kr, dir := newTestKeyring(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	id, _ := newID()
	if _, err := kr.Create(ctx, "p", []byte("x")); !errors.Is(err, context.Canceled) {
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
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("directory has %d entries, want only the master key", len(entries))
	}
}
