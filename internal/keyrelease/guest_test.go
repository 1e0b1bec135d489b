package keyrelease_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/internal/keyrelease"
)

// TestHolderRevoke: a revoked secret's action runs with its name, and the
// file it was written to is gone, as is the record of it.
func TestHolderRevoke(t *testing.T) {
	h := keyrelease.Holder{Dir: filepath.Join(t.TempDir(), "state")}
	if err := h.SaveToken("tok"); err != nil {
		t.Fatal(err)
	}
	if tok, err := h.Token(); err != nil || tok != "tok" {
		t.Fatalf("token %q %v", tok, err)
	}
	out := filepath.Join(t.TempDir(), "disk.key")
	os.WriteFile(out, []byte("secret"), 0o600)
	if err := h.Remember("disk", out); err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	if err := h.Revoke(context.Background(), "disk", `echo "closing for $VTPM_SECRET"`, &log); err != nil {
		t.Fatal(err)
	}
	if log.String() != "closing for disk\n" {
		t.Fatalf("the action wrote %q", log.String())
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Fatalf("the secret's file is still there: %v", err)
	}
	// Again (told twice, or never written): nothing to forget, no error.
	if err := h.Revoke(context.Background(), "disk", "", &log); err != nil {
		t.Fatal(err)
	}
	if err := h.Remember("../x", out); err == nil {
		t.Fatal("remembered a name that is a path")
	}
}
