package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
)

// newConsoleCommand prints a sign-in link to the web console: the
// operator's view, or with PROJECT that project's alone.
func newConsoleCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "console [PROJECT]",
		Short: "Print a sign-in link to the web console (/ui/), for the operator or for one project's view; it works for 15 minutes, and is a password meanwhile",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			project := ""
			if len(args) == 1 {
				project = args[0]
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
}
