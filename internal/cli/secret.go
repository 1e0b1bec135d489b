package cli

import (
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/cmdline"
)

func newSecretCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "secret", Short: "Secrets: released by name only to attested instances (the key broker), or key material for os_vtpm_keys"}
	var file, policy, maxAge string
	var releaseTo []string
	create := &cobra.Command{
		Use: "create [NAME --release-to INSTANCE... | --policy POLICY] --payload-file FILE",
		Short: "Store the file's contents as a secret of the project. With NAME: released only to the named instances " +
			"(or those judged by the policy) while they and their hosts are trusted, inside their vTPM (vtpm-guest secret get NAME). " +
			"Without: key material for os_vtpm_keys, whose id it prints. The payload is never shown again.",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return cmdline.Usagef("--payload-file is required (the secret never goes on the command line)")
			}
			if len(args) == 0 && (len(releaseTo) > 0 || policy != "" || maxAge != "") {
				return cmdline.Usagef("--release-to, --policy and --max-evidence-age are for a named secret (secret create NAME)")
			}
			if len(args) == 1 && len(releaseTo) == 0 && policy == "" {
				return cmdline.Usagef("say whom the secret is for: --release-to INSTANCE (repeatable) or --policy POLICY")
			}
			data, err := os.ReadFile(file)
			if err != nil {
				return cmdline.Exit(ExitUsage, err)
			}
			if len(args) == 1 {
				s, err := g.client().CreateBrokerSecret(cmd.Context(), api.CreateBrokerSecretRequest{Name: args[0], Payload: data,
					ReleaseTo: releaseTo, Policy: policy, MaxEvidenceAge: maxAge})
				clear(data)
				if err != nil {
					return apiFailure(err)
				}
				return printBrokerSecret(cmd.OutOrStdout(), g.format(outputTable), s)
			}
			s, err := g.client().CreateSecret(cmd.Context(), api.CreateSecretRequest{Payload: strings.TrimRight(string(data), "\n")})
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
	create.Flags().StringVar(&file, "payload-file", "", "file holding the secret")
	create.Flags().StringSliceVar(&releaseTo, "release-to", nil, "an instance the named secret is released to (repeatable)")
	create.Flags().StringVar(&policy, "policy", "", "release the named secret to instances judged by this policy")
	create.Flags().StringVar(&maxAge, "max-evidence-age", "", "how old an instance's and its host's last evidence may be at a release (default 2m)")
	cmd.AddCommand(create,
		&cobra.Command{
			Use:   "show NAME",
			Short: "Show a named secret's release conditions and releases (never its payload)",
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
			Short: "List the project's named secrets",
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
			Short: "Delete a named secret and shred its payload; no instance gets it any more",
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
