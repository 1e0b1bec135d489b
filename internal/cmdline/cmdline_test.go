package cmdline

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/spf13/cobra"
)

// TestExitStatus: Main turns what a command returns into an exit status and a message.
func TestExitStatus(t *testing.T) {
	for _, c := range []struct {
		err    error
		args   []string
		code   int
		stderr string
	}{
		{nil, nil, ExitOK, ""},
		{errors.New("boom"), nil, ExitFailed, "prog: boom\n"},
		{Exit(5, errors.New("away")), nil, 5, "prog: away\n"},
		{Exit(ExitFailed, nil), nil, ExitFailed, ""},
		{Usagef("bad %s", "flag"), nil, ExitUsage, "prog: bad flag\nRun 'prog --help' for usage.\n"},
		{nil, []string{"extra"}, ExitUsage, "prog: prog takes no arguments, got \"extra\"\nRun 'prog --help' for usage.\n"},
	} {
		root := &cobra.Command{Use: "prog", Args: NoArgs, SilenceErrors: true, SilenceUsage: true,
			RunE: func(*cobra.Command, []string) error { return c.err }}
		var out, errOut bytes.Buffer
		if code := Main(context.Background(), root, "prog", c.args, &out, &errOut); code != c.code || errOut.String() != c.stderr {
			t.Errorf("%v %v: exit %d %q, want %d %q", c.err, c.args, code, errOut.String(), c.code, c.stderr)
		}
	}
}
