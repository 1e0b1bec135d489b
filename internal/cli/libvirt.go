package cli

import (
	"context"
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cmdline"
)

func newAttachCommand(g *globals) *cobra.Command {
	var domain string
	cmd := newActionCommand(g, "attach", "Attach a vTPM to a libvirt domain on its host (the rest of the domain is kept)", "active",
		func(c *client.Client, ctx context.Context, id string) (api.VTPM, error) {
			return c.Attach(ctx, id, domain)
		})
	cmd.Flags().StringVar(&domain, "domain", "", "libvirt domain name (required)")
	cmd.MarkFlagRequired("domain")
	return cmd
}

func newDoctorCommand(g *globals) *cobra.Command {
	var (
		host   string
		repair bool
	)
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Find drift between hosts and records: libvirt secrets or TPM state with no vTPM, vTPMs whose domain or state is gone",
		Long: `doctor asks each host's agent (or the one given) what differs between its hypervisor and
vtpmd's records. It changes nothing unless --delete-orphans is given, which deletes the
libvirt secrets and TPM state directories that no vTPM record refers to. Exit status 1 when
drift remains.`,
		Args: cmdline.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			hosts := []string{host}
			if host == "" {
				hs, err := c.Hosts(cmd.Context())
				if err != nil {
					return apiFailure(err)
				}
				hosts = hosts[:0]
				for _, h := range hs.Items {
					hosts = append(hosts, h.Name)
				}
			}
			var drifts []api.Drift
			for _, h := range hosts {
				d, err := c.Drift(cmd.Context(), h, repair)
				if err != nil {
					return apiFailure(err)
				}
				drifts = append(drifts, d)
			}
			if err := printDrift(cmd, g.format(outputTable), drifts); err != nil {
				return err
			}
			for _, d := range drifts {
				for _, f := range d.Findings {
					if !f.Deleted {
						return cmdline.Exit(ExitFailed, nil)
					}
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&host, "host", "", "only this host (default: every host)")
	cmd.Flags().BoolVar(&repair, "delete-orphans", false, "delete libvirt secrets and TPM state that no vTPM refers to")
	return cmd
}

func printDrift(cmd *cobra.Command, format string, drifts []api.Drift) error {
	w := cmd.OutOrStdout()
	if format == outputJSON {
		if drifts == nil {
			drifts = []api.Drift{}
		}
		return writeJSON(w, drifts)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tKIND\tOBJECT\tINSTANCE\tDELETED\tDETAIL")
	n := 0
	for _, d := range drifts {
		for _, f := range d.Findings {
			n++
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%t\t%s\n", d.Host, f.Kind, f.Object, orDash([]string{f.InstanceID}), f.Deleted, f.Detail)
		}
	}
	if n == 0 {
		_, err := fmt.Fprintln(cmd.ErrOrStderr(), "no drift")
		return err
	}
	return tw.Flush()
}
