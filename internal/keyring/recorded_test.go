package keyring

import (
	"context"
	"errors"
	"testing"
)

// TestRecorded: a secret whose record fails is deleted again; a secret is
// shredded only after its commit succeeded, also when the caller's context
// is already cancelled; shredding what is gone is no error.
func TestRecorded(t *testing.T) {
	kr := newTestKeyring(t)
	ctx := context.Background()
	refused := errors.New("record refused")
	var made string
	_, err := CreateRecorded(ctx, kr, "p1", []byte("k"), func(id string) error { made = id; return refused })
	if !errors.Is(err, refused) {
		t.Fatalf("CreateRecorded with a failing record: %v", err)
	}
	if _, err := kr.Get(ctx, made); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the secret of a failed record is still there: %v", err)
	}

	id, err := CreateRecorded(ctx, kr, "p1", []byte("k"), func(string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if err := ShredRecorded(ctx, kr, func() ([]string, error) { return []string{id}, refused }); !errors.Is(err, refused) {
		t.Fatalf("ShredRecorded with a failing commit: %v", err)
	}
	if _, err := kr.Get(ctx, id); err != nil {
		t.Fatalf("a secret was shredded though its commit failed: %v", err)
	}

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if err := ShredRecorded(cancelled, kr, func() ([]string, error) { return []string{id, "", id}, nil }); err != nil {
		t.Fatalf("ShredRecorded: %v", err)
	}
	if _, err := kr.Get(ctx, id); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after ShredRecorded: %v", err)
	}
}
