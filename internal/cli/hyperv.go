package cli

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/cmdline"
)

func newHyperVCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "hyperv", Short: "Hyper-V vTPMs: their key material, the plan a Hyper-V host runs, and hosts' key-manager credentials"}
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
	cmd.AddCommand(newHyperVKeyCommand(g))
	return cmd
}

// newHyperVKeyCommand stores the key material a Hyper-V vTPM names in
// os_vtpm_keys (an owner guardian's certificate), which only the host of
// an instance naming it fetches.
func newHyperVKeyCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "key", Short: "Key material for Hyper-V vTPMs' os_vtpm_keys"}
	var file string
	create := &cobra.Command{
		Use: "create --payload-file FILE",
		Short: "Store the file's contents (e.g. an owner guardian's base64 PFX) in the key manager for the project and print its id, " +
			"to name in os_vtpm_keys. The payload is never shown again.",
		Args: cmdline.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return cmdline.Usagef("--payload-file is required (key material never goes on the command line)")
			}
			data, err := os.ReadFile(file)
			if err != nil {
				return cmdline.Exit(ExitUsage, err)
			}
			s, err := g.client().CreateSecret(cmd.Context(), api.CreateSecretRequest{Payload: strings.TrimRight(string(data), "\n")})
			clear(data)
			if err != nil {
				return apiFailure(err)
			}
			if g.format(outputTable) == outputJSON {
				return writeJSON(cmd.OutOrStdout(), s)
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), s.ID)
			return err
		},
	}
	create.Flags().StringVar(&file, "payload-file", "", "file holding the key material")
	cmd.AddCommand(create)
	return cmd
}
