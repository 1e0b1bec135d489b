package daemon

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
)

// waitPool waits until n pooled TPMs are manufactured.
func waitPool(t *testing.T, dir string, n int) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
		ready, _ := filepath.Glob(filepath.Join(dir, "vtpms", ".pool", "*", "identity.json"))
		if len(ready) >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d pooled TPMs after a minute", len(ready), n)
		}
	}
}

// TestPool: a create takes a pre-manufactured TPM whose key becomes a
// secret of the vTPM's project; the TPM is certified like any other and
// keeps its data across a daemon restart.
func TestPool(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "test-host", PoolSize: new(2)}
	u := startConfigured(t, cfg)
	waitPool(t, dir, 2)
	id := "0a0a0a0a-0000-4000-8000-0000000000b1"
	v := u.create(t, id, "2.0")
	checkIdentity(t, u.c, v)
	events, _ := u.c.Events(context.Background(), id)
	var actions []string
	for _, e := range events.Items {
		actions = append(actions, e.Action)
	}
	if !strings.Contains(strings.Join(actions, ","), "adopted a pre-manufactured TPM") {
		t.Fatalf("the create did not take a pooled TPM: %v", actions)
	}
	withTPM(t, v.Sockets.Data, func(tpm transport.TPM) { nvWrite(t, tpm, []byte("pooled")) })
	waitPool(t, dir, 2) // topped up again

	u.stop()
	kr := openKeyring(t, dir)
	s, err := kr.Get(context.Background(), v.SecretRef)
	if err != nil || s.Project != "p1" {
		t.Fatalf("the adopted secret %s: project %q, %v", v.SecretRef, s.Project, err)
	}
	u = startConfigured(t, cfg)
	v = u.wait(t, id, "active")
	if got := readUserNV(t, v); !bytes.Equal(got, []byte("pooled")) {
		t.Fatalf("NV after restart = %q", got)
	}
}
