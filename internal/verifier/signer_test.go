package verifier

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/internal/keyring"
)

// The verdict key is made once and found again; when its reference file
// cannot be written, the key's secret does not stay behind.
func TestOpenSigner(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	kr, err := keyring.OpenEmbedded(filepath.Join(dir, "keys"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := OpenSigner(ctx, filepath.Join(dir, "missing", "verdict-key"), kr); err == nil {
		t.Fatal("a reference file that cannot be written made a signer")
	}
	if ids, err := kr.List(ctx); err != nil || len(ids) != 0 {
		t.Fatalf("secrets after the failed first open: %v %v", ids, err)
	}
	ref := filepath.Join(dir, "verdict-key")
	first, err := OpenSigner(ctx, ref, kr)
	if err != nil {
		t.Fatal(err)
	}
	again, err := OpenSigner(ctx, ref, kr)
	if err != nil || !bytes.Equal(first.JWKS(), again.JWKS()) {
		t.Fatalf("reopened: %v, keys %s and %s", err, first.JWKS(), again.JWKS())
	}
	if ids, _ := kr.List(ctx); len(ids) != 1 {
		t.Fatalf("secrets: %v, want the one key", ids)
	}
}
