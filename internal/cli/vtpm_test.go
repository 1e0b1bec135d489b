package cli

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/server"
	"github.com/vtpmd/vtpmd/internal/server/servertest"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
)

// apiServer runs the real API on a real store and key manager, with one
// host and no agent (vTPMs stay pending), and returns its URL.
func apiServer(t *testing.T) string {
	t.Helper()
	return servertest.Operator(t, newAPI(t).Handler())
}

// newAPI is the real API on a real store and key manager, with one host
// and no agent.
func newAPI(t *testing.T) *server.Server {
	t.Helper()
	dir := t.TempDir()
	st, err := store.Open(context.Background(), filepath.Join(dir, "db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	kr, err := embedded.Open(context.Background(), st, filepath.Join(dir, "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	traits := spec.HostTraits(spec.Capabilities{Enabled: true, Models: []spec.Model{spec.TIS}}).List()
	if err := st.Update(context.Background(), func(tx *store.Tx) error {
		return tx.PutHost(&store.Host{Name: "h1", Traits: traits, Capacity: 5, Backend: "swtpm"})
	}); err != nil {
		t.Fatal(err)
	}
	return servertest.New(t, st, kr)
}

func TestVTPMCommandsExitCodes(t *testing.T) {
	url := apiServer(t)
	id := "7d7a0c4e-8f4b-4bd2-9d6e-2b8f4f3c1a10"
	base := []string{"--server", url}

	code, out, errOut := run(t, append(base, "create", "--instance", id, "--for-project", "p1", "--flavor-spec", "hw:tpm_version=2.0", "--wait=false", "-o", "json")...)
	var v api.VTPM
	if code != ExitOK || json.Unmarshal([]byte(out), &v) != nil || v.InstanceID != id || v.Phase != "pending" {
		t.Fatalf("create: %d %q %q", code, out, errOut)
	}
	cases := []struct {
		args []string
		code int
		want string // in stdout or stderr
	}{
		{[]string{"create", "--instance", id, "--for-project", "p1", "--flavor-spec", "hw:tpm_version=2.0", "--wait=false"}, ExitConflict, string(api.CodeAlreadyExists)},
		{[]string{"create", "--instance", "x", "--for-project", "p1", "--flavor-spec", "hw:tpm_version=2.0", "-o", "json"}, ExitFailed, `"code": "invalid_instance_id"`},
		{[]string{"create", "--instance", "11111111-2222-4333-8444-555555555555", "--for-project", "p1", "--flavor-spec", "hw:tpm_version=3.0", "-o", "json"}, ExitFailed, `"code": "invalid_tpm_version"`},
		{[]string{"create", "--flavor-spec", "hw:tpm_version=2.0"}, ExitUsage, "--instance is required"},
		{[]string{"show", "11111111-2222-4333-8444-555555555555"}, ExitNotFound, string(api.CodeNotFound)},
		{[]string{"show"}, ExitUsage, "exactly one argument"},
		{[]string{"identity", id}, ExitConflict, string(api.CodeNotReady)},
		{[]string{"show", id}, ExitOK, "pending"},
		{[]string{"list"}, ExitOK, id},
		{[]string{"hosts"}, ExitOK, "COMPUTE_SECURITY_TPM_2_0"},
		{[]string{"host", "list"}, ExitOK, "COMPUTE_SECURITY_TPM_2_0"},
		{[]string{"--project", "p1", "hosts"}, ExitFailed, string(api.CodeForbidden)},
		{[]string{"--project", "p1", "create", "--instance", "11111111-2222-4333-8444-555555555555", "--flavor-spec", "hw:tpm_version=2.0", "--wait=false"}, ExitFailed, "created by the cloud"},
		{[]string{"--project", "other", "show", id}, ExitNotFound, string(api.CodeNotFound)},
		{[]string{"events", id}, ExitOK, "created"},
		{[]string{"events", "--all", id}, ExitOK, "INCARNATION"},
		{[]string{"--project", "p1", "events", "--all", id}, ExitFailed, string(api.CodeForbidden)},
	}
	for _, c := range cases {
		code, out, errOut := run(t, append(base, c.args...)...)
		if code != c.code || !strings.Contains(out+errOut, c.want) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want exit %d and %q", c.args, code, out, errOut, c.code, c.want)
		}
	}

	code, _, errOut = run(t, "--server", "http://127.0.0.1:1", "list")
	if code != ExitUnreachable || !strings.Contains(errOut, "cannot reach vtpmd") {
		t.Fatalf("unreachable server: exit %d, %q", code, errOut)
	}
}
