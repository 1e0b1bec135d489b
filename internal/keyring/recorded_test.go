package keyring_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
)

func TestMain(m *testing.M) { os.Exit(storetest.Main(m)) }

// TestRecorded: a secret whose record fails is deleted again, unless the
// record's commit may have happened after all; a secret is
// shredded only after its commit succeeded, also when the caller's context
// is already cancelled; shredding what is gone is no error.
func TestRecorded(t *testing.T) {
	ctx := context.Background()
	kr, err := embedded.Open(ctx, storetest.Open(t), filepath.Join(t.TempDir(), "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	refused := errors.New("record refused")
	var made string
	_, err = keyring.CreateRecorded(ctx, kr, "p1", "", []byte("k"), func(id string) error { made = id; return refused })
	if !errors.Is(err, refused) {
		t.Fatalf("keyring.CreateRecorded with a failing record: %v", err)
	}
	if _, err := kr.Get(ctx, made); !errors.Is(err, keyring.ErrNotFound) {
		t.Fatalf("the secret of a failed record is still there: %v", err)
	}

	unknown := &store.UnavailableError{Err: errors.New("connection reset"), Committing: true}
	_, err = keyring.CreateRecorded(ctx, kr, "p1", "", []byte("k"), func(id string) error { made = id; return unknown })
	if !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("CreateRecorded with a commit of unknown outcome: %v", err)
	}
	if _, err := kr.Get(ctx, made); err != nil {
		t.Fatalf("the secret of a record that may have committed was deleted: %v", err)
	}

	id, err := keyring.CreateRecorded(ctx, kr, "p1", "", []byte("k"), func(string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if err := keyring.ShredRecorded(ctx, kr, func() ([]string, error) { return []string{id}, refused }); !errors.Is(err, refused) {
		t.Fatalf("keyring.ShredRecorded with a failing commit: %v", err)
	}
	if _, err := kr.Get(ctx, id); err != nil {
		t.Fatalf("a secret was shredded though its commit failed: %v", err)
	}

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if err := keyring.ShredRecorded(cancelled, kr, func() ([]string, error) { return []string{id, "", id}, nil }); err != nil {
		t.Fatalf("keyring.ShredRecorded: %v", err)
	}
	if _, err := kr.Get(ctx, id); !errors.Is(err, keyring.ErrNotFound) {
		t.Fatalf("after keyring.ShredRecorded: %v", err)
	}
}
