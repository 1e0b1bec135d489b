// Package command is vtpmd's command tree: the roles the daemon runs
// (all-in-one) and the tools beside them (agent configure-host,
// xen-uuid-server, config print). Commands write only to the command's
// own output streams, so tests drive them with SetArgs, SetOut and SetErr.
package command

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

// Exit statuses of vtpmd.
const (
	ExitOK     = 0
	ExitFailed = 1 // the role failed to start or stopped on an error
	ExitUsage  = 2 // the command line or the configuration is wrong
)

// exitError ends vtpmd with status code; a non-nil err is printed to
// stderr, and for usage errors a pointer to --help follows it.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

func usageError(err error) error { return &exitError{ExitUsage, err} }

func usageErrorf(format string, a ...any) error { return usageError(fmt.Errorf(format, a...)) }

// noArgs refuses positional arguments as a usage error.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		if cmd.HasSubCommands() {
			return usageErrorf("unknown command %q", args[0])
		}
		return usageErrorf("%s takes no arguments, got %q", cmd.CommandPath(), args[0])
	}
	return nil
}

// needSubcommand is the run of a command that only groups others: it shows
// them on stderr and fails as a usage error.
func needSubcommand(cmd *cobra.Command, args []string) error {
	fmt.Fprint(cmd.ErrOrStderr(), cmd.UsageString())
	return &exitError{code: ExitUsage}
}

// NewRootCommand builds vtpmd's command tree.
func NewRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "vtpmd",
		Short:         "vtpmd gives cloud instances virtual TPMs, and attests them and their hosts",
		SilenceErrors: true,
		SilenceUsage:  true,
		Args:          noArgs,
		RunE:          needSubcommand,
	}
	root.CompletionOptions.DisableDefaultCmd = true
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error { return usageError(err) })
	agent := &cobra.Command{
		Use:   "agent",
		Short: "Prepare this hypervisor host",
		Args:  noArgs,
		RunE:  needSubcommand,
	}
	agent.AddCommand(newConfigureHostCommand())
	config := &cobra.Command{
		Use:   "config",
		Short: "Show vtpmd's configuration",
		Args:  noArgs,
		RunE:  needSubcommand,
	}
	config.AddCommand(newConfigPrintCommand())
	root.AddCommand(newAllInOneCommand(), agent, newXenUUIDServerCommand(), config)
	return root
}

// Main runs vtpmd with args until ctx ends, and returns its exit status.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := NewRootCommand()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return ExitOK
	}
	code := ExitFailed
	var ee *exitError
	if errors.As(err, &ee) {
		code, err = ee.code, ee.err
	}
	if err != nil {
		fmt.Fprintf(stderr, "vtpmd: %v\n", err)
	}
	if code == ExitUsage && err != nil {
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
	}
	return code
}
