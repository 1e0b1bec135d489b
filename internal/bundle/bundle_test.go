package bundle

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/spec"
)

const (
	testInstance    = "6f1c2b1e-3c1d-4a5e-9f00-0a1b2c3d4e5f"
	testIncarnation = "0011223344556677"
)

var testSecret = bytes.Repeat([]byte("s"), 384)

func testBundle() *Bundle {
	return &Bundle{
		Header: Header{InstanceID: testInstance, Incarnation: testIncarnation, SecretRef: "11111111-2222-3333-4444-555555555555",
			Generation: 7, Created: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), SourceHost: "host-a", Backend: "swtpm"},
		Project: "p1",
		Spec:    spec.Spec{Version: spec.V20, Model: spec.CRB, SecretSecurity: spec.SecretSecurity("host")},
		EKs:     []EK{{Kind: "rsa2048", Handle: 0x81010001, NVIndex: 0x01c00002, PublicDER: []byte{1, 2, 3}, CertDER: []byte{4, 5}}},
		Files:   []File{{Name: "tpm2-00.permall", Data: bytes.Repeat([]byte{0xab}, 9000)}, {Name: "identity.json", Data: []byte(`[]`)}},
	}
}

func seal(t testing.TB, b *Bundle) []byte {
	t.Helper()
	data, err := Seal(b, testSecret)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestRoundTrip(t *testing.T) {
	in := testBundle()
	data := seal(t, in)
	h, err := ReadHeader(data)
	if err != nil || h != in.Header {
		t.Fatalf("ReadHeader = %+v, %v; want %+v", h, err, in.Header)
	}
	out, err := Open(data, testSecret, testInstance, testIncarnation)
	if err != nil {
		t.Fatal(err)
	}
	if out.Header != in.Header || out.Project != in.Project || out.Spec.Version != in.Spec.Version || out.Spec.Model != in.Spec.Model ||
		out.Spec.SecretSecurity != in.Spec.SecretSecurity || len(out.EKs) != 1 || !bytes.Equal(out.EKs[0].CertDER, in.EKs[0].CertDER) {
		t.Fatalf("opened %+v, sealed %+v", out, in)
	}
	for _, f := range in.Files {
		if got, ok := out.File(f.Name); !ok || !bytes.Equal(got, f.Data) {
			t.Fatalf("file %s differs", f.Name)
		}
	}
	// Two seals of the same bundle share nothing after the header.
	if again := seal(t, in); bytes.Equal(again, data) {
		t.Fatal("two seals are the same bytes: salt and nonce are not random")
	}
}

// TestEveryByteCounts changes each byte of a bundle in turn: every change
// is refused, with bundle_corrupt's error or, where it changes the
// instance or incarnation in the header, bundle_mismatch's.
func TestEveryByteCounts(t *testing.T) {
	b := testBundle()
	b.Files = []File{{Name: "tpm2-00.permall", Data: []byte("state")}}
	data := seal(t, b)
	for i := range data {
		bad := bytes.Clone(data)
		bad[i] ^= 0x01
		_, err := Open(bad, testSecret, testInstance, testIncarnation)
		if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrMismatch) {
			t.Fatalf("byte %d changed: Open = %v, want a refusal", i, err)
		}
	}
}

func TestRefusals(t *testing.T) {
	data := seal(t, testBundle())
	other := testBundle()
	other.InstanceID = "00000000-0000-4000-8000-000000000001"
	otherData := seal(t, other)
	for _, tc := range []struct {
		name             string
		data, secret     []byte
		instance, incarn string
		want             error
	}{
		{"truncated", data[:len(data)-1], testSecret, testInstance, testIncarnation, ErrCorrupt},
		{"cut in the header", data[:20], testSecret, testInstance, testIncarnation, ErrCorrupt},
		{"empty", nil, testSecret, testInstance, testIncarnation, ErrCorrupt},
		{"not a bundle", []byte("hello, this is not a bundle at all, not at all"), testSecret, testInstance, testIncarnation, ErrCorrupt},
		{"another secret", data, bytes.Repeat([]byte("t"), 384), testInstance, testIncarnation, ErrCorrupt},
		{"another vTPM's", otherData, testSecret, testInstance, testIncarnation, ErrMismatch},
		{"another incarnation", data, testSecret, testInstance, "ffff", ErrMismatch},
		{"appended", append(bytes.Clone(data), 0), testSecret, testInstance, testIncarnation, ErrCorrupt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Open(tc.data, tc.secret, tc.instance, tc.incarn); !errors.Is(err, tc.want) {
				t.Fatalf("Open = %v, want %v", err, tc.want)
			}
		})
	}
}

// TestHeaderSwap puts another vTPM's header on a bundle: it claims the
// right vTPM, and its seal fails.
func TestHeaderSwap(t *testing.T) {
	other := testBundle()
	other.InstanceID = "00000000-0000-4000-8000-000000000001"
	data := seal(t, other)
	_, off, err := split(data)
	if err != nil {
		t.Fatal(err)
	}
	mine := seal(t, testBundle())
	_, moff, _ := split(mine)
	forged := append(bytes.Clone(mine[:moff]), data[off:]...)
	if _, err := Open(forged, testSecret, testInstance, testIncarnation); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open of a forged header = %v, want ErrCorrupt", err)
	}
}

func TestSealRefuses(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*Bundle)
	}{
		{"no files", func(b *Bundle) { b.Files = nil }},
		{"a path", func(b *Bundle) { b.Files[0].Name = "../etc/passwd" }},
		{"dot dot", func(b *Bundle) { b.Files[0].Name = ".." }},
		{"twice", func(b *Bundle) { b.Files[1].Name = b.Files[0].Name }},
		{"no instance", func(b *Bundle) { b.InstanceID = "" }},
		{"too large", func(b *Bundle) { b.Files[0].Data = make([]byte, MaxFile+1) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := testBundle()
			tc.mutate(b)
			if _, err := Seal(b, testSecret); err == nil {
				t.Fatal("sealed")
			}
		})
	}
	if _, err := Seal(testBundle(), nil); err == nil {
		t.Fatal("sealed without a secret")
	}
}

// FuzzOpen feeds Open what a holder may be handed: it never panics, and
// whatever it opens is a bundle Seal could have written, of the vTPM asked
// for.
func FuzzOpen(f *testing.F) {
	f.Add(seal(f, testBundle()))
	b := testBundle()
	b.Files = []File{{Name: "a", Data: nil}}
	f.Add(seal(f, b))
	f.Add([]byte(magic + "\x01\x00\x00\x00\x02{}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		ReadHeader(data)
		out, err := Open(data, testSecret, testInstance, testIncarnation)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrMismatch) {
				t.Fatalf("Open = %v: neither corrupt nor mismatch", err)
			}
			return
		}
		if out.InstanceID != testInstance || out.check() != nil {
			t.Fatalf("opened %+v", out.Header)
		}
	})
}

// FuzzParseBody reaches the body parser past the seal, as a writer that is
// not Seal would.
func FuzzParseBody(f *testing.F) {
	f.Add([]byte{0, 0, 0, 2, '{', '}', 0, 1, 0, 1, 'a', 0, 0, 0, 1, 'x'})
	f.Fuzz(func(t *testing.T, body []byte) {
		b, err := parseBody(body)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("parseBody = %v, not ErrCorrupt", err)
			}
			return
		}
		b.Header = Header{InstanceID: testInstance, Incarnation: testIncarnation}
		data, err := Seal(b, testSecret)
		if err != nil {
			t.Fatalf("parsed a bundle Seal refuses: %v", err)
		}
		if _, err := Open(data, testSecret, testInstance, testIncarnation); err != nil {
			t.Fatal(err)
		}
	})
}
