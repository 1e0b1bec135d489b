package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

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

func newAdoptCommand(g *globals) *cobra.Command {
	var (
		id      string
		req     api.AdoptRequest
		wait    bool
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "adopt --instance UUID --domain NAME",
		Short: "Take over the vTPM Nova made for an instance (the operator's): libvirt's emulator TPM of a domain, state and secret kept",
		Long: `adopt has vtpmd manage the vTPM that Nova made for a libvirt guest: the host's agent
(--host, or the libvirt host that has the domain) reads the vTPM from the domain, opens a copy
of its state (in libvirt's /var/lib/libvirt/swtpm/INSTANCE/) with the key-manager secret the
domain names (or --secret, Nova's vtpm_secret_uuid) and reads its endorsement keys. The state
and the secret stay where they are; nothing is rewritten and no secret is made. From then on
vtpmd starts, stops, deletes and attests the vTPM like one of its own. Running it again after
an interruption is safe.`,
		Args: cmdline.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			v, err := c.Adopt(cmd.Context(), id, req)
			if err != nil {
				return apiFailure(err)
			}
			if wait {
				phase := "active"
				if v.Desired == "stopped" {
					phase = "stopped"
				}
				if v, err = waitFor(cmd.Context(), c, cmd.ErrOrStderr(), v.InstanceID, timeout, phase); err != nil {
					return err
				}
			}
			return printVTPM(cmd.OutOrStdout(), g.format(outputTable), v)
		},
	}
	f := cmd.Flags()
	f.StringVar(&id, "instance", "", "the instance's UUID, which is its libvirt domain's (required)")
	f.StringVar(&req.Domain, "domain", "", "the libvirt domain's name, e.g. instance-0000002a (required)")
	f.StringVar(&req.Host, "host", "", "the host whose agent has the domain (default: every libvirt host that is up)")
	f.StringVar(&req.SecretRef, "secret", "", "the key-manager secret of the vTPM, Nova's vtpm_secret_uuid (default: the one the domain names)")
	f.StringVar(&req.Project, "project", "", "the project that owns the instance (default: the secret's)")
	f.BoolVar(&wait, "wait", true, "wait until the host's agent has taken the vTPM in hand (active, or stopped if the guest is off)")
	f.DurationVar(&timeout, "timeout", time.Minute, "how long to wait")
	cmd.MarkFlagRequired("instance")
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
