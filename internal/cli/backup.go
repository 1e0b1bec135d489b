package cli

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
)

func newBackupCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "backup",
		Short: "Back up a vTPM's state, list its backups, restore one (the operator's)",
		Long: `backup keeps a vTPM's state on the server: its host's agent exports the swtpm state as it
is at rest (still encrypted with the vTPM's secret) in a bundle sealed with a key derived from
that secret, so it opens only for that vTPM and any changed byte is refused. Each backup has
a generation that grows with every export; the server keeps the newest few (vtpmd server
--backup-keep) and takes them itself every --backup-interval (hourly unless set; 0: never) and at
every stop.`,
	}
	cmd.AddCommand(
		&cobra.Command{
			Use:   "create INSTANCE",
			Short: "Back up a vTPM's state now",
			Args:  exactlyOne,
			RunE: func(cmd *cobra.Command, args []string) error {
				b, err := g.client().CreateBackup(cmd.Context(), args[0])
				if err != nil {
					return apiFailure(err)
				}
				if g.format(outputTable) == outputJSON {
					return writeJSON(cmd.OutOrStdout(), b) // the backup made, as the API's answer
				}
				return printBackups(cmd.OutOrStdout(), outputTable, []api.Backup{b})
			},
		},
		&cobra.Command{
			Use:   "list INSTANCE",
			Short: "List a vTPM's backups, newest first",
			Args:  exactlyOne,
			RunE: func(cmd *cobra.Command, args []string) error {
				l, err := g.client().Backups(cmd.Context(), args[0])
				if err != nil {
					return apiFailure(err)
				}
				return printBackups(cmd.OutOrStdout(), g.format(outputTable), l.Items)
			},
		},
		newRestoreCommand(g),
	)
	return cmd
}

func newRestoreCommand(g *globals) *cobra.Command {
	var req api.RestoreRequest
	cmd := &cobra.Command{
		Use:   "restore INSTANCE",
		Short: "Replace a stopped vTPM's state with a backup",
		Long: `restore puts a backup's state back on the vTPM's host: the vTPM must be stopped (vtpmctl stop).
The host's agent opens the bundle with the vTPM's secret and proves it is the same TPM (its
endorsement keys are the vTPM's) before it replaces anything; the vTPM keeps its identity, and
loses what changed in it after the backup. A generation older than the newest recorded is
refused (stale_bundle) unless --allow-rollback, which is recorded in the vTPM's events with
your name.`,
		Args: exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			b, err := g.client().RestoreBackup(cmd.Context(), args[0], req)
			if err != nil {
				return apiFailure(err)
			}
			if g.format(outputTable) == outputJSON {
				return writeJSON(cmd.OutOrStdout(), b)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "restored generation %d (taken %s on host %s); start the vTPM to use it\n",
				b.Generation, b.CreatedAt.Format(time.RFC3339), b.SourceHost)
			return nil
		},
	}
	cmd.Flags().Int64Var(&req.Generation, "generation", 0, "the backup's generation (default: the newest)")
	cmd.Flags().BoolVar(&req.AllowRollback, "allow-rollback", false, "restore a generation older than the newest recorded (rolls the TPM back)")
	return cmd
}

func printBackups(w io.Writer, format string, bs []api.Backup) error {
	if format == outputJSON {
		return writeJSON(w, bs)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GENERATION\tTAKEN\tREASON\tHOST\tBYTES")
	for _, b := range bs {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\n", b.Generation, b.CreatedAt.Format(time.RFC3339), b.Reason, b.SourceHost, b.Size)
	}
	return tw.Flush()
}
