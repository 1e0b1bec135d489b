package swtpmhost

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

const instance = "1d1d1d1d-0000-4000-8000-000000000001"

// An identity file as vtpmd has always written it (the JSON of the store's
// EK records): state made by an earlier vtpmd must keep its identity.
const oldIdentity = `[{"kind":"rsa2048","handle":2164326401,"nv_index":29360130,"public_der":"AQI=","cert_der":"Aw=="},` +
	`{"kind":"ecc-nist-p256","handle":2164326402,"nv_index":29360138,"public_der":"BA=="}]`

// TestIdentityKept: a directory that holds a finished TPM (its identity
// file) is kept, and its EKs read from the file as earlier versions wrote
// it; a vTPM whose record says it was manufactured is never made again over
// state that lost its identity, by Ensure or Manufacture.
func TestIdentityKept(t *testing.T) {
	ctx := context.Background()
	r, err := New(Config{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	v := agent.VTPM{InstanceID: instance, Spec: spec.Spec{Version: spec.V20}}

	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, IdentityFile), []byte(oldIdentity), 0o600); err != nil {
		t.Fatal(err)
	}
	eks, err := r.Manufacture(ctx, v, nil, dir)
	want := []agent.EK{
		{Kind: "rsa2048", Handle: 0x81010001, NVIndex: 0x01c00002, PublicDER: []byte{1, 2}, CertDER: []byte{3}},
		{Kind: "ecc-nist-p256", Handle: 0x81010002, NVIndex: 0x01c0000a, PublicDER: []byte{4}},
	}
	if err != nil || !reflect.DeepEqual(eks, want) {
		t.Fatalf("EKs of a finished TPM: %+v %v, want %+v", eks, err, want)
	}

	v.Manufactured = true
	empty := t.TempDir()
	if _, err := r.Manufacture(ctx, v, nil, empty); err == nil || !strings.Contains(err.Error(), "refusing to re-manufacture") {
		t.Fatalf("Manufacture over a manufactured vTPM's lost state: %v", err)
	}
	if err := os.Mkdir(r.Dir(instance), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(r.Dir(instance), "tpm2-00.permall"), []byte("state"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Ensure(ctx, v, nil); err == nil || !strings.Contains(err.Error(), "refusing to re-manufacture") {
		t.Fatalf("Ensure over a manufactured vTPM's state without its identity: %v", err)
	}
	if data, err := os.ReadFile(filepath.Join(r.Dir(instance), "tpm2-00.permall")); err != nil || string(data) != "state" {
		t.Fatalf("the state after the refusals: %q %v", data, err)
	}
}

// TestManufactureOnce: a manufactured TPM's EKs (certified by the
// Certifier) are recorded beside its state in the identity file's format,
// and a second Manufacture returns them without making the TPM again.
func TestManufactureOnce(t *testing.T) {
	swtpmtest.Require(t)
	ctx := context.Background()
	root := t.TempDir()
	r, err := New(Config{Root: root, Certifier: certifier{swtpmtest.NewCA(t)}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.Close(ctx)
		swtpmtest.CheckNoProcesses(t, root)
	})
	secret, err := keyring.NewVTPMSecret()
	if err != nil {
		t.Fatal(err)
	}
	v := agent.VTPM{InstanceID: instance, Spec: spec.Spec{Version: spec.V20}}
	dir := filepath.Join(t.TempDir(), "tpm2")
	eks, err := r.Manufacture(ctx, v, secret, dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(eks) != 2 || eks[0].Kind != "rsa2048" || eks[1].Kind != "ecc-nist-p256" || len(eks[0].CertDER) == 0 || len(eks[1].PublicDER) == 0 {
		t.Fatalf("EKs %+v", eks)
	}
	data, err := os.ReadFile(filepath.Join(dir, IdentityFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"kind":`, `"handle":`, `"nv_index":`, `"public_der":`, `"cert_der":`} {
		if !strings.Contains(string(data), key) {
			t.Errorf("the identity file has no %s: %s", key, data)
		}
	}
	again, err := r.Manufacture(ctx, v, secret, dir)
	if err != nil || !reflect.DeepEqual(again, eks) {
		t.Fatalf("a second Manufacture: %+v %v, want the first's EKs", again, err)
	}
}
