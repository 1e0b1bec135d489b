package cli

import (
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/cmdline"
)

func newSecretCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "secret", Short: "Named secrets, released only to attested instances (the key broker)"}
	var file, policy, maxAge string
	var releaseTo []string
	create := &cobra.Command{
		Use: "create NAME (--release-to INSTANCE... | --policy POLICY) --payload-file FILE",
		Short: "Store the file's contents as the project's secret NAME, released only to the named instances " +
			"(or those judged by the policy) while they and their hosts are trusted, inside their vTPM (vtpm-guest secret get NAME). " +
			"The payload is never shown again.",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				// The names the secret is asked for by (vtpm-guest secret
				// get), shown, listed and deleted by; a Hyper-V vTPM's key
				// material has a command of its own.
				return cmdline.Usagef("secret create needs the secret's NAME, which instances ask for it by " +
					"(key material for a Hyper-V vTPM's os_vtpm_keys: vtpmctl hyperv key create)")
			}
			return exactlyOne(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return cmdline.Usagef("--payload-file is required (the secret never goes on the command line)")
			}
			if len(releaseTo) == 0 && policy == "" {
				return cmdline.Usagef("say whom the secret is for: --release-to INSTANCE (repeatable) or --policy POLICY")
			}
			data, err := os.ReadFile(file)
			if err != nil {
				return cmdline.Exit(ExitUsage, err)
			}
			s, err := g.client().CreateBrokerSecret(cmd.Context(), api.CreateBrokerSecretRequest{Name: args[0], Payload: data,
				ReleaseTo: releaseTo, Policy: policy, MaxEvidenceAge: maxAge})
			clear(data)
			if err != nil {
				return apiFailure(err)
			}
			return printBrokerSecret(cmd.OutOrStdout(), g.format(outputTable), s)
		},
	}
	create.Flags().StringVar(&file, "payload-file", "", "file holding the secret")
	create.Flags().StringSliceVar(&releaseTo, "release-to", nil, "an instance the secret is released to (repeatable)")
	create.Flags().StringVar(&policy, "policy", "", "release the secret to instances judged by this policy")
	create.Flags().StringVar(&maxAge, "max-evidence-age", "", "how old an instance's and its host's last evidence may be at a release (default 2m)")
	cmd.AddCommand(create,
		&cobra.Command{
			Use:   "show NAME",
			Short: "Show a secret's release conditions and releases (never its payload)",
			Args:  exactlyOne,
			RunE: func(cmd *cobra.Command, args []string) error {
				s, err := g.client().BrokerSecret(cmd.Context(), args[0])
				if err != nil {
					return apiFailure(err)
				}
				return printBrokerSecret(cmd.OutOrStdout(), g.format(outputTable), s)
			},
		},
		&cobra.Command{
			Use:   "list",
			Short: "List the project's secrets",
			Args:  cmdline.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				l, err := g.client().BrokerSecrets(cmd.Context())
				if err != nil {
					return apiFailure(err)
				}
				if g.format(outputTable) == outputJSON {
					return writeJSON(cmd.OutOrStdout(), l.Items)
				}
				tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tPROJECT\tRELEASE TO\tPOLICY\tMAX EVIDENCE AGE\tCREATED")
				for _, s := range l.Items {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.Project, orDash(s.ReleaseTo), orDash([]string{s.Policy}), s.MaxEvidenceAge, s.CreatedAt.Format(time.RFC3339))
				}
				return tw.Flush()
			},
		},
		&cobra.Command{
			Use:   "delete NAME",
			Short: "Delete a secret and shred its payload; no instance gets it any more",
			Args:  exactlyOne,
			RunE: func(cmd *cobra.Command, args []string) error {
				if err := g.client().DeleteBrokerSecret(cmd.Context(), args[0]); err != nil {
					return apiFailure(err)
				}
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "secret %s deleted\n", args[0])
				return err
			},
		})
	return cmd
}

func printBrokerSecret(w io.Writer, format string, s api.BrokerSecret) error {
	if format == outputJSON {
		return writeJSON(w, s)
	}
	fields := [][2]string{{"NAME", s.Name}, {"PROJECT", s.Project}, {"RELEASE TO", orDash(s.ReleaseTo)}, {"POLICY", orDash([]string{s.Policy})},
		{"MAX EVIDENCE AGE", s.MaxEvidenceAge}, {"CREATED", s.CreatedAt.Format(time.RFC3339)}}
	for _, r := range s.Releases {
		state := fmt.Sprintf("released %s (%d times)", r.ReleasedAt.Format(time.RFC3339), r.Releases)
		if !r.RevokedAt.IsZero() {
			state += fmt.Sprintf(", revoked %s: %s", r.RevokedAt.Format(time.RFC3339), r.Reason)
		}
		fields = append(fields, [2]string{"INSTANCE " + r.InstanceID, state})
	}
	return writeFields(w, fields)
}
