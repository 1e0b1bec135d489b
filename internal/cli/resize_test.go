package cli

import (
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
)

// TestResizeCommands: vtpmctl resize, resize confirm and resize revert
// against the real API with no agent (vTPMs stay pending), each refusal
// with its exit status and code.
func TestResizeCommands(t *testing.T) {
	url := apiServer(t)
	id := "7d7a0c4e-8f4b-4bd2-9d6e-2b8f4f3c1a10"
	added := "11111111-2222-4333-8444-555555555555"
	base := []string{"--server", url}
	if code, out, errOut := run(t, append(base, "create", "--instance", id, "--for-project", "p1", "--flavor-spec", "hw:tpm_version=2.0", "--wait=false")...); code != ExitOK {
		t.Fatalf("create: %d %q %q", code, out, errOut)
	}
	for _, c := range []struct {
		args []string
		code int
		want string // in stdout or stderr
	}{
		{[]string{"resize"}, ExitUsage, "exactly one argument"},
		{[]string{"resize", id, "--flavor-spec", "hw:tpm_version"}, ExitUsage, "KEY=VALUE"},
		{[]string{"resize", id, "--flavor-spec", "hw:tpm_version=3", "-o", "json"}, ExitFailed, `"code": "invalid_tpm_version"`},
		{[]string{"resize", id, "--flavor-spec", "hw:tpm_version=2.0"}, ExitConflict, string(api.CodeInvalidPhase)},
		{[]string{"resize", "confirm", id}, ExitConflict, string(api.CodeNoResizePending)},
		{[]string{"resize", "revert", id}, ExitConflict, string(api.CodeNoResizePending)},
		{[]string{"resize", "confirm"}, ExitUsage, "exactly one argument"},
		// An instance without a vTPM gets one; reverted before any agent
		// acted on it, it is gone at once.
		{[]string{"resize", added, "--for-project", "p1", "--host", "h1", "--flavor-spec", "hw:tpm_version=2.0", "--wait=false"}, ExitOK, "add resized"},
		{[]string{"resize", "revert", added}, ExitOK, "deleted"},
		{[]string{"show", added}, ExitNotFound, string(api.CodeNotFound)},
	} {
		code, out, errOut := run(t, append(base, c.args...)...)
		if code != c.code || !strings.Contains(out+errOut, c.want) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want exit %d and %q", c.args, code, out, errOut, c.code, c.want)
		}
	}
}
