package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
)

// newConsoleCommand prints a sign-in link to the web console: the
// operator's view, or with PROJECT that project's alone; with
// --end-sessions it ends the console's sessions instead.
func newConsoleCommand(g *globals) *cobra.Command {
	var end bool
	cmd := &cobra.Command{
		Use:   "console [PROJECT]",
		Short: "Print a sign-in link to the web console (/ui/), for the operator or for one project's view; it works once, within 15 minutes, and is a password meanwhile",
		Long: "Print a sign-in link to the web console (/ui/), for the operator or for one project's view; it works once, within 15 minutes, and is a password meanwhile.\n\n" +
			"With --end-sessions, end every web console session and unused sign-in link instead (with PROJECT, that project's), on every server replica.",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			project := ""
			if len(args) == 1 {
				project = args[0]
			}
			if end {
				ended, err := g.client().EndConsoleSessions(cmd.Context(), project)
				if err != nil {
					return apiFailure(err)
				}
				if g.format(outputTable) == outputJSON {
					return writeJSON(cmd.OutOrStdout(), ended)
				}
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "ended %d web console sessions and sign-in links\n", ended.Ended)
				return err
			}
			link, err := g.client().ConsoleLink(cmd.Context(), project)
			if err != nil {
				return apiFailure(err)
			}
			if g.format(outputTable) == outputJSON {
				return writeJSON(cmd.OutOrStdout(), link)
			}
			who := "the operator"
			if link.Project != "" {
				who = "project " + link.Project
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "web console sign-in link for %s, until %s:\n", who, link.ExpiresAt.Format(time.RFC3339))
			_, err = fmt.Fprintln(cmd.OutOrStdout(), link.URL)
			return err
		},
	}
	cmd.Flags().BoolVar(&end, "end-sessions", false, "end the web console's sessions and unused sign-in links (PROJECT's alone, if given) instead")
	return cmd
}
