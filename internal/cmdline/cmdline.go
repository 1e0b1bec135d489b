// Package cmdline is what vtpmd's command-line programs (vtpmd, vtpmctl)
// share: their exit statuses, the error that carries one, and running a
// cobra command tree to an exit status.
package cmdline

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

// Exit statuses every program uses; vtpmctl adds its own above these.
const (
	ExitOK     = 0
	ExitFailed = 1 // the command failed or was refused
	ExitUsage  = 2 // the command line or the configuration is wrong
)

// Error ends a program with status Code; a non-nil Err is printed to
// stderr, and for usage errors a pointer to --help follows it.
type Error struct {
	Code int
	Err  error
}

func (e *Error) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

// Exit is an Error with status code; err may be nil when the command has
// said all it has to say.
func Exit(code int, err error) error { return &Error{Code: code, Err: err} }

// Usage is a usage error: status ExitUsage.
func Usage(err error) error { return Exit(ExitUsage, err) }

// Usagef is a usage error with a formatted message.
func Usagef(format string, a ...any) error { return Usage(fmt.Errorf(format, a...)) }

// NoArgs refuses positional arguments as a usage error.
func NoArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		if cmd.HasSubCommands() {
			return Usagef("unknown command %q", args[0])
		}
		return Usagef("%s takes no arguments, got %q", cmd.CommandPath(), args[0])
	}
	return nil
}

// NeedSubcommand is the run of a command that only groups others: it shows
// them on stderr and fails as a usage error.
func NeedSubcommand(cmd *cobra.Command, args []string) error {
	fmt.Fprint(cmd.ErrOrStderr(), cmd.UsageString())
	return Exit(ExitUsage, nil)
}

// Main runs root with args until ctx ends and returns the exit status:
// ExitOK, an Error's code, or ExitFailed for any other error. Errors go to
// stderr after "prog: ".
func Main(ctx context.Context, root *cobra.Command, prog string, args []string, stdout, stderr io.Writer) int {
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return ExitOK
	}
	code := ExitFailed
	var ee *Error
	if errors.As(err, &ee) {
		code, err = ee.Code, ee.Err
	}
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", prog, err)
	}
	if code == ExitUsage && err != nil {
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
	}
	return code
}
