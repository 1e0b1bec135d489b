package cli

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cmdline"
)

func newPolicyCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Measured-boot policies: named references, and the one each instance or host is judged by"}
	cmd.AddCommand(policyLearnCommand(g), policyApplyCommand(g), policyCreateCommand(g),
		&cobra.Command{
			Use:   "list",
			Short: "List the policies: the project's own and the operator's shared ones",
			Args:  cmdline.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				l, err := g.client().Policies(cmd.Context())
				if err != nil {
					return apiFailure(err)
				}
				return printPolicies(cmd.OutOrStdout(), g.format(outputTable), l.Items)
			},
		},
		&cobra.Command{
			Use:   "show NAME",
			Short: "Show a policy's reference values",
			Args:  exactlyOne,
			RunE: func(cmd *cobra.Command, args []string) error {
				p, err := g.client().Policy(cmd.Context(), args[0])
				if err != nil {
					return apiFailure(err)
				}
				return printPolicy(cmd.OutOrStdout(), g.format(outputTable), p)
			},
		},
		&cobra.Command{
			Use:   "delete NAME",
			Short: "Delete a policy; the instances it was applied to keep their copy",
			Args:  exactlyOne,
			RunE: func(cmd *cobra.Command, args []string) error {
				if err := g.client().DeletePolicy(cmd.Context(), args[0]); err != nil {
					return apiFailure(err)
				}
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "policy %s deleted\n", args[0])
				return err
			},
		})
	return cmd
}

// subjectFlag adds --host: the command's argument names a host, not an
// instance.
func subjectFlag(cmd *cobra.Command) func(string) client.Subject {
	host := cmd.Flags().Bool("host", false, "the argument names a host (its own TPM), not an instance")
	return func(arg string) client.Subject {
		if *host {
			return client.Host(arg)
		}
		return client.Instance(arg)
	}
}

func policyLearnCommand(g *globals) *cobra.Command {
	var pcrs string
	var digests bool
	cmd := &cobra.Command{
		Use:   "learn INSTANCE | --host HOST",
		Short: "Take the last accepted evidence of an instance (or a host) as its reference boot, and judge it",
		Args:  exactlyOne,
	}
	subject := subjectFlag(cmd)
	cmd.Flags().StringVar(&pcrs, "pcrs", "", "PCRs the policy covers, e.g. 0,1,2,3,4,5,6,7 (default: every PCR quoted, but 10 for values)")
	cmd.Flags().BoolVar(&digests, "digests", false, "learn the digests the PCRs' events carry (IMA's file digests for PCR 10), not the PCRs' values")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		which, err := pcrList(pcrs)
		if err != nil {
			return err
		}
		a, err := g.client().SetPolicy(cmd.Context(), subject(args[0]), api.PolicyRequest{Learn: true, PCRs: which, Digests: digests})
		if err != nil {
			return apiFailure(err)
		}
		return printAttestation(cmd.OutOrStdout(), g.format(outputTable), a)
	}
	return cmd
}

func policyApplyCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "apply NAME INSTANCE | NAME --host HOST",
		Short: "Judge an instance (or a host) by a copy of a named policy, from now on and its last evidence at once",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 2 {
				return cmdline.Usagef("%s takes a policy name and an instance (or host), got %d arguments", cmd.CommandPath(), len(args))
			}
			return nil
		},
	}
	subject := subjectFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		a, err := g.client().SetPolicy(cmd.Context(), subject(args[1]), api.PolicyRequest{Policy: args[0]})
		if err != nil {
			return apiFailure(err)
		}
		return printAttestation(cmd.OutOrStdout(), g.format(outputTable), a)
	}
	return cmd
}

func policyCreateCommand(g *globals) *cobra.Command {
	var values, allowed []string
	var from, fromHost, pcrs, project string
	var digests bool
	cmd := &cobra.Command{
		Use:   "create NAME (--pcr N=SHA256HEX ... | --allow N=SHA256HEX ... | --from INSTANCE | --from-host HOST)",
		Short: "Create a named policy from reference values, or learn it from an instance's (or host's) last accepted evidence",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			req := api.CreatePolicyRequest{Name: args[0], Project: project}
			for _, v := range values {
				i, digest, err := pcrDigest("--pcr", v)
				if err != nil {
					return err
				}
				if req.PCRs == nil {
					req.PCRs = map[int]string{}
				}
				req.PCRs[i] = digest
			}
			for _, v := range allowed {
				i, digest, err := pcrDigest("--allow", v)
				if err != nil {
					return err
				}
				if req.Digests == nil {
					req.Digests = map[int][]string{}
				}
				req.Digests[i] = append(req.Digests[i], digest)
			}
			if from != "" || fromHost != "" {
				which, err := pcrList(pcrs)
				if err != nil {
					return err
				}
				req.LearnFrom = &api.LearnFrom{InstanceID: from, Host: fromHost, PCRs: which, Digests: digests}
			}
			p, err := g.client().CreatePolicy(cmd.Context(), req)
			if err != nil {
				return apiFailure(err)
			}
			return printPolicy(cmd.OutOrStdout(), g.format(outputTable), p)
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&values, "pcr", nil, "a reference value, N=SHA256HEX: PCR N must hold it (repeatable)")
	f.StringArrayVar(&allowed, "allow", nil, "an allowed digest, N=SHA256HEX: PCR N's events may carry it (repeatable; for 10, IMA file digests)")
	f.BoolVar(&digests, "digests", false, "with --from or --from-host: learn the digests the events carry, not the PCRs' values")
	f.StringVar(&from, "from", "", "learn from this instance's last accepted evidence")
	f.StringVar(&fromHost, "from-host", "", "learn from this host's last accepted evidence (operator)")
	f.StringVar(&pcrs, "pcrs", "", "with --from or --from-host: the PCRs to take, e.g. 0,4,7 (default: every PCR quoted)")
	f.StringVar(&project, "project", "", "the owning project (default: the caller's; the operator's is shared)")
	return cmd
}

// pcrDigest parses N=SHA256HEX; the server checks the digest.
func pcrDigest(flag, v string) (int, string, error) {
	n, digest, ok := strings.Cut(v, "=")
	i, err := strconv.Atoi(n)
	if !ok || err != nil {
		return 0, "", cmdline.Usagef("%s %q: want N=SHA256HEX", flag, v)
	}
	return i, digest, nil
}

// pcrList parses "0,4,7"; nil for "".
func pcrList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' }) {
		i, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, cmdline.Usagef("--pcrs: %q is not a PCR number", f)
		}
		out = append(out, i)
	}
	return out, nil
}

func printPolicies(w io.Writer, format string, ps []api.Policy) error {
	if format == outputJSON {
		return writeJSON(w, ps)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tPROJECT\tPCRS\tLEARNED FROM\tCREATED")
	for _, p := range ps {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", p.Name, orDash([]string{p.Project}), pcrIndexes(p), orDash([]string{p.LearnedFrom}), p.CreatedAt.Format(time.RFC3339))
	}
	return tw.Flush()
}

func printPolicy(w io.Writer, format string, p api.Policy) error {
	if format == outputJSON {
		return writeJSON(w, p)
	}
	log := "-"
	if p.HasEventLog {
		log = "kept (a mismatch names the event)"
	}
	fields := [][2]string{{"NAME", p.Name}, {"PROJECT", orDash([]string{p.Project})}, {"LEARNED FROM", orDash([]string{p.LearnedFrom})},
		{"EVENT LOG", log}, {"CREATED", p.CreatedAt.Format(time.RFC3339)}}
	for _, i := range slices.Sorted(maps.Keys(p.PCRs)) {
		fields = append(fields, [2]string{"PCR " + strconv.Itoa(i), p.PCRs[i]})
	}
	for _, i := range slices.Sorted(maps.Keys(p.Digests)) {
		for _, d := range p.Digests[i] {
			fields = append(fields, [2]string{"PCR " + strconv.Itoa(i) + " ALLOWS", d})
		}
	}
	return writeFields(w, fields)
}

func pcrIndexes(p api.Policy) string {
	idx := slices.AppendSeq(slices.Collect(maps.Keys(p.PCRs)), maps.Keys(p.Digests))
	slices.Sort(idx)
	var out []string
	for _, i := range slices.Compact(idx) {
		out = append(out, strconv.Itoa(i))
	}
	return strings.Join(out, ",")
}
