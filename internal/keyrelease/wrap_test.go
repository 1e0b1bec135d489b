package keyrelease_test

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/keyrelease"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// vtpm is a running vTPM made as vtpmd makes one, with an AK loaded the
// way the guest agent makes it.
type vtpm struct {
	tpm transport.TPM
	ek  swtpm.EK // the RSA EK
	ecc swtpm.EK // the P-256 EK
	ak  tpm2.NamedHandle
}

func newVTPM(t *testing.T) *vtpm {
	t.Helper()
	i, id := swtpmtest.Manufactured(t, spec.V20, nil)
	swtpmtest.Start(t, i)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	tpm, err := swtpm.Dial(ctx, i.DataSocket())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tpm.Close() })
	ak, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(attest.RSAAKTemplate)}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	return &vtpm{tpm: tpm, ek: id.EKs[0], ecc: id.EKs[1], ak: tpm2.NamedHandle{Handle: ak.ObjectHandle, Name: ak.Name}}
}

func (v *vtpm) wrap(t *testing.T, binding, payload []byte) *keyrelease.Wrapped {
	t.Helper()
	w, err := keyrelease.Wrap(v.ek.Public, v.ak.Name.Buffer, binding, payload)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// TestWrapOpensOnlyInItsVTPM: a release wrapped for one vTPM opens there,
// after a trip through its wire form, and nowhere else: not in another
// vTPM (its own AK loaded, or none of the right name), and not with its
// binding changed.
func TestWrapOpensOnlyInItsVTPM(t *testing.T) {
	a, b := newVTPM(t), newVTPM(t)
	payload := []byte("disk key: correct horse battery staple")
	binding := keyrelease.Binding("inst-a", "inc-1", "disk", "rel-1")
	wire := a.wrap(t, binding, payload).Marshal()

	w, err := keyrelease.Parse(wire)
	if err != nil {
		t.Fatal(err)
	}
	got, err := keyrelease.Unwrap(a.tpm, a.ak, tpm2.TPMHandle(a.ek.Handle), w)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("unwrapping in its own vTPM: %q, %v", got, err)
	}
	if bytes.Contains(wire, payload) {
		t.Fatal("the wire form carries the payload in clear")
	}

	// Another vTPM: its own EK and AK. The credential is for a's EK, so
	// b's TPM cannot decrypt its seed.
	// (libtpms answers a seed its EK cannot decrypt with TPM_RC_FAILURE,
	// and goes on working: b opens a release of its own after.)
	if got, err := keyrelease.Unwrap(b.tpm, b.ak, tpm2.TPMHandle(b.ek.Handle), w); err == nil || got != nil {
		t.Fatalf("another vTPM opened the release: %q", got)
	}
	if got, err := keyrelease.Unwrap(b.tpm, b.ak, tpm2.TPMHandle(b.ek.Handle), b.wrap(t, nil, []byte("b's"))); err != nil || string(got) != "b's" {
		t.Fatalf("the other vTPM opening its own release after: %q %v", got, err)
	}
	// Another vTPM, claiming a's AK name for its own AK: the TPM checks
	// the name of the object it holds.
	if got, err := keyrelease.Unwrap(b.tpm, tpm2.NamedHandle{Handle: b.ak.Handle, Name: a.ak.Name}, tpm2.TPMHandle(b.ek.Handle), w); err == nil || got != nil {
		t.Fatalf("another vTPM opened the release with a's AK name: %q", got)
	}
	// The same vTPM with another key than the registered AK.
	other, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(attest.RSAAKTemplate)}.Execute(a.tpm)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := keyrelease.Unwrap(a.tpm, tpm2.NamedHandle{Handle: other.ObjectHandle, Name: other.Name}, tpm2.TPMHandle(a.ek.Handle), w); err == nil {
		t.Fatal("the release opened with another AK than the one it is bound to")
	}
	tpm2.FlushContext{FlushHandle: other.ObjectHandle}.Execute(a.tpm)

	// The binding is sealed with the payload.
	w2, _ := keyrelease.Parse(wire)
	w2.Binding = keyrelease.Binding("inst-b", "inc-1", "disk", "rel-1")
	if _, err := keyrelease.Unwrap(a.tpm, a.ak, tpm2.TPMHandle(a.ek.Handle), w2); !errors.Is(err, keyrelease.ErrNotOpened) {
		t.Fatalf("a changed binding: %v; want ErrNotOpened", err)
	}
}

// TestWrapToECCEK: a release to the P-256 EK opens with it, as one to the
// RSA EK does.
func TestWrapToECCEK(t *testing.T) {
	a := newVTPM(t)
	w, err := keyrelease.Wrap(a.ecc.Public, a.ak.Name.Buffer, nil, []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := keyrelease.Unwrap(a.tpm, a.ak, tpm2.TPMHandle(a.ecc.Handle), w); err != nil || string(got) != "x" {
		t.Fatalf("unwrapping with the P-256 EK: %q, %v", got, err)
	}
}

func TestParseRefusesMalformed(t *testing.T) {
	good := (&keyrelease.Wrapped{CredentialBlob: []byte{1}, EncryptedSeed: []byte{2}, Nonce: make([]byte, 12), Ciphertext: make([]byte, 17)}).Marshal()
	if _, err := keyrelease.Parse(good); err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{
		"empty":       nil,
		"truncated":   good[:len(good)-1],
		"trailing":    append(bytes.Clone(good), 0),
		"other magic": append([]byte("x"), good[1:]...),
		"short nonce": (&keyrelease.Wrapped{CredentialBlob: []byte{1}, EncryptedSeed: []byte{2}, Nonce: make([]byte, 8), Ciphertext: make([]byte, 17)}).Marshal(),
		"no tag":      (&keyrelease.Wrapped{CredentialBlob: []byte{1}, EncryptedSeed: []byte{2}, Nonce: make([]byte, 12), Ciphertext: make([]byte, 15)}).Marshal(),
		"no seed":     (&keyrelease.Wrapped{CredentialBlob: []byte{1}, Nonce: make([]byte, 12), Ciphertext: make([]byte, 17)}).Marshal(),
	} {
		if _, err := keyrelease.Parse(b); !errors.Is(err, keyrelease.ErrMalformed) {
			t.Errorf("%s: %v; want ErrMalformed", name, err)
		}
	}
}

// FuzzParse: Parse never panics, and what it accepts is exactly what
// Marshal writes back.
func FuzzParse(f *testing.F) {
	f.Add((&keyrelease.Wrapped{CredentialBlob: []byte{1, 2}, EncryptedSeed: []byte{3}, Binding: []byte("b"), Nonce: make([]byte, 12), Ciphertext: make([]byte, 20)}).Marshal())
	f.Add([]byte("vtpmd-wrapped-secret/1\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		w, err := keyrelease.Parse(b)
		if err != nil {
			if !errors.Is(err, keyrelease.ErrMalformed) {
				t.Fatalf("error %v is not ErrMalformed", err)
			}
			return
		}
		if !bytes.Equal(w.Marshal(), b) {
			t.Fatalf("Parse accepted bytes Marshal does not write back")
		}
		if _, err := w.Open(make([]byte, 32)); !errors.Is(err, keyrelease.ErrNotOpened) && err != nil {
			t.Fatalf("Open: %v", err)
		}
	})
}
