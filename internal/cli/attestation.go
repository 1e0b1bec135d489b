package cli

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
)

func newAttestationCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "attestation", Short: "Attestation of an instance: registration and verdict"}
	cmd.AddCommand(&cobra.Command{
		Use:   "status INSTANCE",
		Short: "Show whether the instance's guest registered, and the verdict on its last evidence",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := g.client().Attestation(cmd.Context(), args[0])
			if err != nil {
				return apiFailure(err)
			}
			return printAttestation(cmd.OutOrStdout(), g.format(outputTable), a)
		},
	})
	return cmd
}

func newPolicyCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Measured-boot policies"}
	var pcrs string
	learn := &cobra.Command{
		Use:   "learn INSTANCE",
		Short: "Take the instance's last accepted evidence as its reference boot, and judge it",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			req := api.PolicyRequest{Learn: true}
			for _, f := range strings.FieldsFunc(pcrs, func(r rune) bool { return r == ',' }) {
				i, err := strconv.Atoi(strings.TrimSpace(f))
				if err != nil {
					return &exitError{ExitUsage, fmt.Errorf("--pcrs: %q is not a PCR number", f)}
				}
				req.PCRs = append(req.PCRs, i)
			}
			a, err := g.client().SetPolicy(cmd.Context(), args[0], req)
			if err != nil {
				return apiFailure(err)
			}
			return printAttestation(cmd.OutOrStdout(), g.format(outputTable), a)
		},
	}
	learn.Flags().StringVar(&pcrs, "pcrs", "", "PCRs the policy covers, e.g. 0,1,2,3,4,5,6,7 (default: every PCR quoted)")
	cmd.AddCommand(learn)
	return cmd
}

func printAttestation(w io.Writer, format string, a api.Attestation) error {
	if format == outputJSON {
		return writeJSON(w, a)
	}
	var policy []string
	for _, i := range a.PolicyPCRs {
		policy = append(policy, strconv.Itoa(i))
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, row := range [][2]string{
		{"INSTANCE", a.InstanceID}, {"STATE", a.State}, {"VERDICT", a.Verdict},
		{"REASONS", orDash([]string{strings.Join(a.Reasons, "; ")})},
		{"POLICY PCRS", orDash(policy)}, {"VERIFIED", orDash([]string{verifiedAt(a)})},
	} {
		fmt.Fprintf(tw, "%s\t%s\n", row[0], row[1])
	}
	return tw.Flush()
}

func verifiedAt(a api.Attestation) string {
	if a.VerifiedAt.IsZero() {
		return ""
	}
	return a.VerifiedAt.Format(time.RFC3339)
}
