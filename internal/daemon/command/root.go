// Package command is vtpmd's command tree: the roles the daemon runs
// (server, agent, all-in-one) and the tools beside them (agent
// configure-host, xen-uuid-server, keys rotate-master, config print). Commands write only to the command's
// own output streams, so tests drive them with SetArgs, SetOut and SetErr.
package command

import (
	"context"
	"io"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/internal/cmdline"
)

// Exit statuses of vtpmd (see cmdline).
const (
	ExitOK     = cmdline.ExitOK
	ExitFailed = cmdline.ExitFailed
	ExitUsage  = cmdline.ExitUsage
)

// NewRootCommand builds vtpmd's command tree.
func NewRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "vtpmd",
		Short:         "vtpmd gives cloud instances virtual TPMs, and attests them and their hosts",
		SilenceErrors: true,
		SilenceUsage:  true,
		Args:          cmdline.NoArgs,
		RunE:          cmdline.NeedSubcommand,
	}
	root.CompletionOptions.DisableDefaultCmd = true
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error { return cmdline.Usage(err) })
	config := &cobra.Command{
		Use:   "config",
		Short: "Show vtpmd's configuration",
		Args:  cmdline.NoArgs,
		RunE:  cmdline.NeedSubcommand,
	}
	config.AddCommand(newConfigPrintCommand())
	root.AddCommand(newServerCommand(), newAgentCommand(), newAllInOneCommand(), newXenUUIDServerCommand(), newKeysCommand(), config)
	return root
}

// Main runs vtpmd with args until ctx ends, and returns its exit status.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return cmdline.Main(ctx, NewRootCommand(), "vtpmd", args, stdout, stderr)
}
