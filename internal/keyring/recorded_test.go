package keyring

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/internal/store"
)

// TestRecorded: a secret whose record fails is deleted again, unless the
// record's commit may have happened after all; a secret is
// shredded only after its commit succeeded, also when the caller's context
// is already cancelled; shredding what is gone is no error.
func TestRecorded(t *testing.T) {
	kr, err := OpenEmbedded(filepath.Join(t.TempDir(), "keys"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	refused := errors.New("record refused")
	var made string
	_, err = CreateRecorded(ctx, kr, "p1", []byte("k"), func(id string) error { made = id; return refused })
	if !errors.Is(err, refused) {
		t.Fatalf("CreateRecorded with a failing record: %v", err)
	}
	if _, err := kr.Get(ctx, made); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the secret of a failed record is still there: %v", err)
	}

	unknown := &store.UnavailableError{Err: errors.New("connection reset"), Committing: true}
	_, err = CreateRecorded(ctx, kr, "p1", []byte("k"), func(id string) error { made = id; return unknown })
	if !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("CreateRecorded with a commit of unknown outcome: %v", err)
	}
	if _, err := kr.Get(ctx, made); err != nil {
		t.Fatalf("the secret of a record that may have committed was deleted: %v", err)
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
