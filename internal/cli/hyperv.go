package cli

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func newHyperVCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "hyperv", Short: "Hyper-V vTPMs: the plan a Hyper-V host runs, and hosts' key-manager credentials"}
	var vmName string
	plan := &cobra.Command{
		Use:   "plan INSTANCE",
		Short: "Print the PowerShell plan that gives the instance's Hyper-V VM its vTPM (keys by reference only)",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := g.client().HyperVPlan(cmd.Context(), args[0], vmName)
			if err != nil {
				return apiFailure(err)
			}
			if g.format(outputTable) == outputJSON {
				return writeJSON(cmd.OutOrStdout(), p)
			}
			_, err = io.WriteString(cmd.OutOrStdout(), p.Script)
			return err
		},
	}
	plan.Flags().StringVar(&vmName, "vm-name", "", "the Hyper-V VM's name (default: the instance id)")
	cmd.AddCommand(plan, &cobra.Command{
		Use:   "host-token HOST",
		Short: "Make the host's key-manager credential (replacing its old one); install it on the host, readable by Administrators only",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client().HostCredential(cmd.Context(), args[0])
			if err != nil {
				return apiFailure(err)
			}
			if g.format(outputTable) == outputJSON {
				return writeJSON(cmd.OutOrStdout(), c)
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), c.Token)
			return err
		},
	})
	return cmd
}
