package cli

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
)

// TestConsoleCommand: vtpmctl console prints a sign-in link, for the
// operator or one project; a bad project is refused; --end-sessions ends
// a project's sessions and links, or all.
func TestConsoleCommand(t *testing.T) {
	base := []string{"--server", hostsServer(t)}
	code, out, errOut := run(t, append(base, "console")...)
	if code != ExitOK || !strings.HasPrefix(out, "/ui/login?code=") || !strings.Contains(errOut, "for the operator") {
		t.Fatalf("console: %d %q %q", code, out, errOut)
	}
	code, out, _ = run(t, append(base, "console", "p1", "-o", "json")...)
	var link api.ConsoleLink
	if code != ExitOK || json.Unmarshal([]byte(out), &link) != nil || link.Project != "p1" || link.ExpiresAt.IsZero() {
		t.Fatalf("console p1: %d %q", code, out)
	}
	if code, _, errOut := run(t, append(base, "console", "not a project")...); code != ExitFailed || !strings.Contains(errOut, "invalid_project") {
		t.Fatalf("a bad project: %d %q", code, errOut)
	}

	// Ending p1's sessions: its unused link; then all: the operator's.
	code, out, _ = run(t, append(base, "console", "--end-sessions", "p1", "-o", "json")...)
	var ended api.ConsoleSessionsEnded
	if code != ExitOK || json.Unmarshal([]byte(out), &ended) != nil || ended.Project != "p1" || ended.Ended != 1 {
		t.Fatalf("console --end-sessions p1: %d %q", code, out)
	}
	if code, out, _ := run(t, append(base, "console", "--end-sessions")...); code != ExitOK || out != "ended 1 web console sessions and sign-in links\n" {
		t.Fatalf("console --end-sessions: %d %q", code, out)
	}
}
