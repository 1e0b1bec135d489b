package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cmdline"
	"github.com/vtpmd/vtpmd/internal/keystone"
)

// More exit statuses, for commands that talk to a server.
const (
	ExitNotFound    = 3 // no such vTPM or host
	ExitConflict    = 4 // exists already, no valid host, not ready, being deleted
	ExitUnreachable = 5 // the server did not answer
)

// Where vtpmctl finds the server and its project when no flag says.
const (
	EnvServer  = "VTPMD_SERVER"
	EnvProject = "VTPMD_PROJECT"
	EnvCAFile  = "VTPMD_CA_FILE"
	EnvCert    = "VTPMD_CERT"
	EnvKey     = "VTPMD_KEY"
	// DefaultServer is the operator's socket of a vtpmd on its default
	// data dir: on the host, whoever may open it is the operator.
	DefaultServer = "unix:///var/lib/vtpmd/api.sock"
)

func (g *globals) client() *client.Client {
	c := client.New(g.server, g.project)
	if g.tls != nil {
		c = c.WithTLS(g.tls)
	}
	if g.identity != nil {
		c = c.WithIdentity(g.identity.Token)
	}
	return c
}

// apiFailure turns a client error into vtpmctl's exit status and message.
func apiFailure(err error) error {
	var ce *client.Error
	var ie *client.IdentityError
	if errors.As(err, &ie) {
		if errors.Is(err, keystone.ErrUnavailable) {
			return cmdline.Exit(ExitUnreachable, err)
		}
		return cmdline.Exit(ExitFailed, err)
	}
	if errors.As(err, &ce) {
		code := ExitFailed
		switch ce.Status {
		case http.StatusNotFound:
			code = ExitNotFound
		case http.StatusConflict:
			code = ExitConflict
		}
		return cmdline.Exit(code, err)
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return cmdline.Exit(ExitFailed, err)
	}
	return cmdline.Exit(ExitUnreachable, fmt.Errorf("cannot reach vtpmd: %w", err))
}

func newCreateCommand(g *globals) *cobra.Command {
	var (
		req           api.CreateVTPMRequest
		flavor, image []string
		wait          bool
		timeout       time.Duration
	)
	cmd := &cobra.Command{
		Use:   "create --instance UUID [--flavor-spec K=V]... [--image-prop K=V]...",
		Short: "Create a vTPM for an instance and wait until it runs",
		Example: `  vtpmctl create --instance 7d7a0c4e-8f4b-4bd2-9d6e-2b8f4f3c1a10 --flavor-spec hw:tpm_version=2.0
  vtpmctl create --instance $(uuidgen) --flavor-spec hw:tpm_version=1.2 -o json`,
		Args: cmdline.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if req.InstanceID == "" {
				return cmdline.Usagef("--instance is required")
			}
			var err error
			if req.FlavorSpecs, err = parseProps("--flavor-spec", flavor); err != nil {
				return err
			}
			if req.ImageProps, err = parseProps("--image-prop", image); err != nil {
				return err
			}
			ctx := cmd.Context()
			c := g.client()
			v, err := c.Create(ctx, req)
			if err != nil {
				if ce := new(client.Error); errors.As(err, &ce) && ce.Status == http.StatusBadRequest {
					return refused(cmd.OutOrStdout(), g.format(outputTable), api.Error{Code: ce.Code, Message: ce.Message})
				}
				return apiFailure(err)
			}
			if wait {
				if v, err = waitFor(ctx, c, cmd.ErrOrStderr(), v.InstanceID, timeout, "active"); err != nil {
					return err
				}
			}
			return printVTPM(cmd.OutOrStdout(), g.format(outputTable), v)
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.InstanceID, "instance", "", "instance UUID (required)")
	f.StringVar(&req.Project, "for-project", "", "owning project, when acting as the operator")
	f.StringVar(&req.FlavorName, "flavor-name", "", "flavor name, for messages")
	f.StringArrayVar(&flavor, "flavor-spec", nil, "flavor extra spec `K=V` (repeatable)")
	f.StringVar(&req.ImageName, "image-name", "", "image name, for messages")
	f.StringArrayVar(&image, "image-prop", nil, "image property `K=V` (repeatable)")
	f.BoolVar(&wait, "wait", true, "wait until the vTPM is active")
	f.DurationVar(&timeout, "timeout", 2*time.Minute, "how long to wait")
	return cmd
}

// waitFor polls until the vTPM reaches phase (or is gone, for "deleted"),
// printing each phase it passes through to progress.
func waitFor(ctx context.Context, c *client.Client, progress io.Writer, id string, timeout time.Duration, phase string) (api.VTPM, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	v, err := c.Wait(ctx, id, func(v api.VTPM) bool { return v.Phase == phase || v.Phase == "error" },
		func(v api.VTPM) {
			fmt.Fprintf(progress, "%s  %-12s %s\n", id, v.Phase, time.Since(start).Round(time.Millisecond))
		})
	switch {
	case phase == "deleted" && client.IsNotFound(err):
		fmt.Fprintf(progress, "%s  %-12s %s\n", id, "deleted", time.Since(start).Round(time.Millisecond))
		return v, nil
	case err != nil:
		return v, apiFailure(err)
	case v.Phase == "error":
		return v, cmdline.Exit(ExitFailed, fmt.Errorf("vTPM %s failed: %s", id, v.Reason))
	}
	return v, nil
}

// newActionCommand builds start, stop and delete: one request, then an
// optional wait for the phase it leads to.
func newActionCommand(g *globals, name, short, phase string, do func(*client.Client, context.Context, string) (api.VTPM, error)) *cobra.Command {
	var (
		wait    bool
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   name + " INSTANCE",
		Short: short,
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			v, err := do(c, cmd.Context(), args[0])
			if err != nil {
				return apiFailure(err)
			}
			if wait {
				if v, err = waitFor(cmd.Context(), c, cmd.ErrOrStderr(), v.InstanceID, timeout, phase); err != nil {
					return err
				}
				if phase == "deleted" {
					return nil
				}
			}
			return printVTPM(cmd.OutOrStdout(), g.format(outputTable), v)
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", true, "wait until the vTPM is "+phase)
	cmd.Flags().DurationVar(&timeout, "timeout", time.Minute, "how long to wait")
	return cmd
}

func newShowCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "show INSTANCE",
		Short: "Show a vTPM",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := g.client().Get(cmd.Context(), args[0])
			if err != nil {
				return apiFailure(err)
			}
			return printVTPM(cmd.OutOrStdout(), g.format(outputTable), v)
		},
	}
}

func newListCommand(g *globals) *cobra.Command {
	var o client.ListOptions
	var all bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List vTPMs",
		Args:  cmdline.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			var items []api.VTPM
			for {
				page, err := c.List(cmd.Context(), o)
				if err != nil {
					return apiFailure(err)
				}
				items = append(items, page.Items...)
				if !all || page.Next == "" {
					break
				}
				o.After = page.Next
			}
			if items == nil {
				items = []api.VTPM{}
			}
			w := cmd.OutOrStdout()
			if g.format(outputTable) == outputJSON {
				return writeJSON(w, items)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "INSTANCE\tPROJECT\tTPM\tHOST\tDESIRED\tPHASE\tAGE")
			for _, v := range items {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.InstanceID, v.Project, tpmLabel(v.Spec), v.Host, v.Desired, v.Phase,
					time.Since(v.CreatedAt).Round(time.Second))
			}
			return tw.Flush()
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Project, "project-filter", "", "only this project's vTPMs (operator)")
	f.StringVar(&o.Host, "host", "", "only vTPMs on this host")
	f.StringVar(&o.Phase, "phase", "", "only vTPMs in this phase")
	f.IntVar(&o.Limit, "limit", 0, "page size (server default 100)")
	f.BoolVar(&all, "all", true, "follow pages to the end")
	return cmd
}

func newIdentityCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "identity INSTANCE",
		Short: "Show a vTPM's endorsement keys, EK certificates and CA chain",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := g.client().Identity(cmd.Context(), args[0])
			if err != nil {
				return apiFailure(err)
			}
			w := cmd.OutOrStdout()
			if g.format(outputTable) == outputJSON {
				return writeJSON(w, id)
			}
			for _, ek := range id.EKs {
				fmt.Fprintf(w, "# EK %s at handle %s, certificate in NV %s\n%s%s", ek.Kind, ek.Handle, orDash([]string{ek.NVIndex}), ek.PublicKeyPEM, ek.CertificatePEM)
			}
			fmt.Fprintf(w, "# CA chain\n%s", id.CAChainPEM)
			return nil
		},
	}
}

func newHostsCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "hosts",
		Short: "List hosts with their state, use, capacity, last heartbeat, version, valid host certificates and traits (operator)",
		Args:  cmdline.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			hs, err := g.client().Hosts(cmd.Context())
			if err != nil {
				return apiFailure(err)
			}
			w := cmd.OutOrStdout()
			if g.format(outputTable) == outputJSON {
				return writeJSON(w, hs.Items)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "HOST\tBACKEND\tSTATE\tUSED\tCAPACITY\tLAST HEARTBEAT\tVERSION\tCERTS\tTRAITS")
			for _, h := range hs.Items {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\t%d\t%s\n", h.Name, orDash([]string{h.Backend}), hostState(h), h.Used, h.Capacity,
					ago(h.LastHeartbeat), orDash([]string{h.Version}), h.Certificates, orDash(h.Traits))
			}
			return tw.Flush()
		},
	}
}

func newCACommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "ca",
		Short: "Print the deployment CA chain (PEM) that issues EK certificates",
		Args:  cmdline.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			pem, err := g.client().CA(cmd.Context())
			if err != nil {
				return apiFailure(err)
			}
			_, err = cmd.OutOrStdout().Write(pem)
			return err
		},
	}
}

func newEventsCommand(g *globals) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "events INSTANCE",
		Short: "Show a vTPM's audit log",
		Long: `events shows what happened to the instance's vTPM. An instance id that had a vTPM before
(deleted since, maybe another project's) starts afresh: its earlier vTPMs' events are the
operator's to read, with --all.`,
		Args: exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			read := c.Events
			if all {
				read = c.AllEvents
			}
			evs, err := read(cmd.Context(), args[0])
			if err != nil {
				return apiFailure(err)
			}
			return printEvents(cmd.OutOrStdout(), g.format(outputTable), evs, all)
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "every vTPM the instance id has had, deleted ones included, each event with its vTPM's incarnation (operator)")
	return cmd
}

// printEvents prints events; incarnations adds the column that tells the
// vTPMs of one instance id apart (the first 8 hex digits are enough).
func printEvents(w io.Writer, format string, evs api.EventList, incarnations bool) error {
	if format == outputJSON {
		return writeJSON(w, evs.Items)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	head := "TIME\tACTOR\tACTION\tDETAIL"
	if incarnations {
		head = "INCARNATION\t" + head
	}
	fmt.Fprintln(tw, head)
	for _, e := range evs.Items {
		if incarnations {
			fmt.Fprintf(tw, "%s\t", orDash([]string{e.Incarnation[:min(8, len(e.Incarnation))]}))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", e.At.Format(time.RFC3339), e.Actor, e.Action, e.Detail)
	}
	return tw.Flush()
}

func printVTPM(w io.Writer, format string, v api.VTPM) error {
	if format == outputJSON {
		return writeJSON(w, v)
	}
	data, ctrl, pid := "-", "-", "-"
	if v.Sockets != nil {
		data, ctrl = v.Sockets.Data, v.Sockets.Ctrl
	}
	if v.SwtpmPID != 0 {
		pid = strconv.Itoa(v.SwtpmPID)
	}
	return writeFields(w, [][2]string{
		{"INSTANCE", v.InstanceID},
		{"PROJECT", v.Project},
		{"TPM", tpmLabel(v.Spec)},
		{"SECRET SECURITY", orDash([]string{v.Spec.SecretSecurity})},
		{"HOST", v.Host},
		{"DESIRED", v.Desired},
		{"PHASE", v.Phase},
		{"REASON", orDash([]string{v.Reason})},
		{"RESIZE", resizeLabel(v.Resize)},
		{"DATA SOCKET", data},
		{"CTRL SOCKET", ctrl},
		{"SWTPM PID", pid},
		{"GUEST CONNECTED", yesNo(v.GuestConnected)},
		{"SECRET REF", v.SecretRef},
		{"CREATED", v.CreatedAt.Format(time.RFC3339)},
	})
}

func tpmLabel(s api.VTPMSpec) string {
	l := s.Version
	if s.Model != nil {
		l += " " + *s.Model
	}
	if s.Hypervisor != "" {
		l += " " + s.Hypervisor
	}
	return l
}

// exactlyOne wants one positional argument.
func exactlyOne(cmd *cobra.Command, args []string) error {
	if len(args) != 1 {
		return cmdline.Usagef("%s takes exactly one argument, got %d", cmd.CommandPath(), len(args))
	}
	return nil
}

func envOr(key, def string) string {
	if v := strings.TrimSpace(os.Getenv(key)); v != "" {
		return v
	}
	return def
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
