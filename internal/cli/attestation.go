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
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cmdline"
)

func newAttestationCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "attestation", Short: "Attestation of an instance: registration and verdict"}
	cmd.AddCommand(statusCommand(g, "status INSTANCE",
		"Show whether the instance's guest registered, the verdict on its last evidence, its host's, and the overall answer",
		client.Instance))
	cmd.AddCommand(refreshCommand(g, "refresh INSTANCE", "the instance's guest agent", client.Instance))
	cmd.AddCommand(historyCommand(g, "history INSTANCE",
		"Show the instance's attestation events: registrations, policies, each verdict change of the VM and of its host", client.Instance))
	cmd.AddCommand(&cobra.Command{
		Use:   "token INSTANCE",
		Short: "Print the verdict as a token signed by the verifier, for a relying party to check offline",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			tok, err := g.client().VerdictToken(cmd.Context(), args[0])
			if err != nil {
				return apiFailure(err)
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), tok)
			return err
		},
	})
	return cmd
}

func newHostCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "host", Short: "A host: add (join token), list, show and revoke it, drain, undrain, evacuate and evacuate-live it, attest its own TPM"}
	list := newHostsCommand(g)
	list.Use = "list" // the same as vtpmctl hosts
	cmd.AddCommand(hostAddCommand(g), list, hostShowCommand(g), hostRevokeCommand(g))
	cmd.AddCommand(drainCommand(g, "drain", "Place no new vTPMs on the host (before maintenance); those it holds stay and keep running",
		(*client.Client).DrainHost))
	cmd.AddCommand(drainCommand(g, "undrain", "Place new vTPMs on the host again", (*client.Client).UndrainHost))
	cmd.AddCommand(hostEvacuateCommand(g), hostEvacuateLiveCommand(g))
	cmd.AddCommand(statusCommand(g, "status HOST",
		"Show whether the host's TPM registered, and the verdict on the host's last evidence", client.Host))
	cmd.AddCommand(refreshCommand(g, "refresh HOST", "the host's agent", client.Host))
	cmd.AddCommand(historyCommand(g, "history HOST", "Show the host's own attestation events", client.Host))
	cmd.AddCommand(&cobra.Command{
		Use:   "forget HOST",
		Short: "Drop the host's TPM registration (after replacing its TPM): its next agent registers afresh",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.client().ForgetHost(cmd.Context(), args[0]); err != nil {
				return apiFailure(err)
			}
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "host %s: TPM registration dropped; its instances read it as unattested until it registers again\n", args[0])
			return err
		},
	})
	return cmd
}

// refreshCommand asks the subject's agent for fresh evidence and waits for
// the verdict on it.
func refreshCommand(g *globals, use, agent string, subject func(string) client.Subject) *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   use,
		Short: "Ask " + agent + " for fresh evidence now, and show the verdict on it",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, sub := g.client(), subject(args[0])
			req, err := c.RequestRefresh(cmd.Context(), sub)
			if err != nil {
				return apiFailure(err)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "asked %s for fresh evidence; waiting up to %s\n", agent, timeout)
			for deadline := time.Now().Add(timeout); ; time.Sleep(250 * time.Millisecond) {
				a, err := c.Attestation(cmd.Context(), sub)
				if err != nil {
					return apiFailure(err)
				}
				if !a.VerifiedAt.Before(req.RequestedAt) {
					return printAttestation(cmd.OutOrStdout(), g.format(outputTable), a)
				}
				if time.Now().After(deadline) {
					return cmdline.Exit(ExitFailed, fmt.Errorf("no fresh evidence within %s: is %s running?", timeout, agent))
				}
			}
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", time.Minute, "how long to wait for the fresh verdict")
	return cmd
}

// historyCommand prints the attestation events of the subject its
// argument names.
func historyCommand(g *globals, use, short string, subject func(string) client.Subject) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			evs, err := g.client().History(cmd.Context(), subject(args[0]))
			if err != nil {
				return apiFailure(err)
			}
			return printEvents(cmd.OutOrStdout(), g.format(outputTable), evs, false)
		},
	}
}

// statusCommand prints the attestation status of the subject its argument
// names.
func statusCommand(g *globals, use, short string, subject func(string) client.Subject) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := g.client().Attestation(cmd.Context(), subject(args[0]))
			if err != nil {
				return apiFailure(err)
			}
			return printAttestation(cmd.OutOrStdout(), g.format(outputTable), a)
		},
	}
}

func printAttestation(w io.Writer, format string, a api.Attestation) error {
	if format == outputJSON {
		return writeJSON(w, a)
	}
	var policy []string
	for _, i := range a.PolicyPCRs {
		policy = append(policy, strconv.Itoa(i))
	}
	rows := [][2]string{{"INSTANCE", a.InstanceID}}
	if a.HostName != "" {
		rows = [][2]string{{"HOST", a.HostName}}
	}
	rows = append(rows, [][2]string{
		{"STATE", a.State}, {"VERDICT", a.Verdict},
		{"REASONS", orDash([]string{strings.Join(a.Reasons, "; ")})},
		{"POLICY", policyLabel(a.Policy, policy)}, {"VERIFIED", orDash([]string{verifiedAt(a)})},
	}...)
	if h := a.Host; h != nil {
		rows = append(rows, [2]string{"HOST", h.Name + ": " + h.Verdict + reasons(h.Reasons)})
	}
	if p := a.Provisioning; p != nil {
		what := "EK certificates chain to the deployment CA"
		if !p.Verified {
			what = "not verified: " + p.Reason
		}
		rows = append(rows, [2]string{"PROVISIONING", "on " + p.Host + "; " + what})
	}
	if a.Overall != "" {
		rows = append(rows, [2]string{"OVERALL", a.Overall + " (" + a.Summary + ")"})
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, row := range rows {
		fmt.Fprintf(tw, "%s\t%s\n", row[0], row[1])
	}
	return tw.Flush()
}

// policyLabel is "NAME: PCRs 0,4", "learned: PCRs 0,4" or "-".
func policyLabel(name string, pcrs []string) string {
	if len(pcrs) == 0 {
		return "-"
	}
	if name == "" {
		name = "learned"
	}
	return name + ": PCRs " + strings.Join(pcrs, ",")
}

func reasons(rs []string) string {
	if len(rs) == 0 {
		return ""
	}
	return " (" + strings.Join(rs, "; ") + ")"
}

func verifiedAt(a api.Attestation) string {
	if a.VerifiedAt.IsZero() {
		return ""
	}
	return a.VerifiedAt.Format(time.RFC3339)
}
