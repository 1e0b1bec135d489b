package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/verifier"
)

// A data dir from before the keys moved into the store (keys/ with
// master.key and a sealed file per secret, ca/ and host-ca/ naming their
// keys' secrets, verdict-key) is imported at the first start: the same
// CA, the same verdict key, every secret, under the same master key; the
// old files are gone and a restart finds everything in the store.
func TestLegacyDataDirImported(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	legacy := writeLegacyDataDir(t, dir)

	s, err := StartServer(ctx, Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "control"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := client.New(s.OperatorURL, "").CA(ctx)
	if err != nil || string(chain) != string(legacy.caPEM) {
		t.Fatalf("the CA after the import: %v\n%s\nwant\n%s", err, chain, legacy.caPEM)
	}
	s.Shutdown(ctx)
	for _, gone := range []string{"keys", "ca", "host-ca", "verdict-key"} {
		if _, err := os.Stat(filepath.Join(dir, gone)); !os.IsNotExist(err) {
			t.Errorf("%s is still in the data dir: %v", gone, err)
		}
	}
	kr := openKeyring(t, dir)
	if s, err := kr.Get(ctx, legacy.secret); err != nil || string(s.Payload) != "a tenant's secret" {
		t.Fatalf("the imported secret: %v", err)
	}
	if ids, _ := kr.List(ctx); len(ids) != 1 {
		t.Fatalf("secrets after the import: %v; want the vTPM's only (the CAs' and verdict keys are deployment keys now)", ids)
	}
	st, err := store.Open(ctx, filepath.Join(dir, "vtpmd.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	_, keys, err := openKeys(ctx, Config{DataDir: dir, MasterKeyFile: filepath.Join(dir, "master.key")}, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	if string(keys.verdicts.JWKS()) != string(legacy.jwks) || !keys.hostCA.Certificate().Equal(legacy.hostCA.Certificate()) {
		t.Fatal("the verdict key or the host CA changed in the import")
	}
}

type legacyDir struct {
	caPEM  []byte
	hostCA *ca.CA
	jwks   []byte
	secret string
}

// writeLegacyDataDir lays out dir as a server before this version left
// it. The sealed files are the blobs the embedded key manager makes (the
// format did not change), taken from a scratch store under the same key.
func writeLegacyDataDir(t *testing.T, dir string) legacyDir {
	t.Helper()
	ctx := context.Background()
	keysDir := filepath.Join(dir, "keys")
	if err := os.MkdirAll(keysDir, 0o700); err != nil {
		t.Fatal(err)
	}
	scratch, err := store.Open(ctx, filepath.Join(t.TempDir(), "scratch.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer scratch.Close()
	kr, err := embedded.Open(ctx, scratch, filepath.Join(keysDir, "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	sealed := func(project string, payload []byte) string {
		id, err := kr.Create(ctx, project, "", payload)
		if err != nil {
			t.Fatal(err)
		}
		var k store.SealedKey
		scratch.View(ctx, func(tx *store.Tx) (err error) { k, err = tx.SealedKey(store.SealedSecret, id); return err })
		if err := os.WriteFile(filepath.Join(keysDir, id+embedded.LegacySealedSuffix), k.Blob, 0o600); err != nil {
			t.Fatal(err)
		}
		return id
	}
	var out legacyDir
	for _, name := range []string{"ca", "host-ca"} {
		c, err := ca.New(ca.Options{})
		if err != nil {
			t.Fatal(err)
		}
		both, _ := c.MarshalPEM()
		certBlock, rest := pem.Decode(both)
		keyBlock, _ := pem.Decode(rest)
		id := sealed(embedded.SystemProject, keyBlock.Bytes)
		sum := sha256.Sum256(certBlock.Bytes)
		ref, _ := json.Marshal(map[string]any{"version": 1, "key_secret": id, "certificate_sha256": hex.EncodeToString(sum[:])})
		os.MkdirAll(filepath.Join(dir, name), 0o755)
		os.WriteFile(filepath.Join(dir, name, "ca.pem"), c.ChainPEM(), 0o644)
		os.WriteFile(filepath.Join(dir, name, "ca.json"), ref, 0o600)
		if name == "ca" {
			out.caPEM = c.ChainPEM()
		} else {
			out.hostCA = c
		}
	}
	der, _ := verifier.NewVerdictKey()
	signer, _ := verifier.ParseVerdictKey(der)
	out.jwks = signer.JWKS()
	os.WriteFile(filepath.Join(dir, "verdict-key"), []byte(sealed(embedded.SystemProject, der)), 0o600)
	out.secret = sealed("p1", []byte("a tenant's secret"))
	// The store's record of it (a tenant's), so the server keeps it.
	st, err := store.Open(ctx, filepath.Join(dir, "vtpmd.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.Update(ctx, func(tx *store.Tx) error { return tx.AddSecret(out.secret, "p1") }); err != nil {
		t.Fatal(err)
	}
	return out
}
