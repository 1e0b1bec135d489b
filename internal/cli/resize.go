package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cmdline"
)

func newResizeCommand(g *globals) *cobra.Command {
	var (
		req           api.ResizeRequest
		flavor, image []string
		wait          bool
		timeout       time.Duration
	)
	cmd := &cobra.Command{
		Use:   "resize INSTANCE [--flavor-spec K=V]... [--image-prop K=V]...",
		Short: "Resize an instance's vTPM to a new flavor and image, on its host, until confirmed or reverted",
		Long: `Resize applies the new flavor and image to the instance's vTPM with Nova's
semantics: the same TPM version and model keeps the state; another version or
model gives the instance a new TPM and keeps the old one until "resize confirm"
removes it or "resize revert" puts it back; a flavor without a vTPM stops it
until confirm deletes it; an instance without a vTPM gets one, which revert
deletes. Secret security cannot change to or from deployment.`,
		Example: `  vtpmctl resize $ID --flavor-spec hw:tpm_version=2.0 --flavor-spec hw:tpm_model=tpm-crb
  vtpmctl resize confirm $ID
  vtpmctl resize revert $ID`,
		Args: exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			var err error
			if req.FlavorSpecs, err = parseProps("--flavor-spec", flavor); err != nil {
				return err
			}
			if req.ImageProps, err = parseProps("--image-prop", image); err != nil {
				return err
			}
			ctx := cmd.Context()
			c := g.client()
			v, err := c.Resize(ctx, args[0], req)
			if err != nil {
				if ce := new(client.Error); errors.As(err, &ce) && ce.Status == http.StatusBadRequest {
					return refused(cmd.OutOrStdout(), g.format(outputTable), api.Error{Code: ce.Code, Message: ce.Message})
				}
				return apiFailure(err)
			}
			if wait {
				// The host's agent has carried the resize out once the vTPM
				// is active or stopped again.
				if v, err = waitResize(ctx, c, cmd.ErrOrStderr(), v.InstanceID, timeout, func(v api.VTPM) bool {
					return v.Phase == "active" || v.Phase == "stopped"
				}); err != nil {
					return err
				}
			}
			return printVTPM(cmd.OutOrStdout(), g.format(outputTable), v)
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.Project, "for-project", "", "owning project of an instance without a vTPM yet, when acting as the operator")
	f.StringVar(&req.Host, "host", "", "the host an instance without a vTPM yet runs on (default: placed as a create is)")
	f.StringVar(&req.FlavorName, "flavor-name", "", "new flavor's name, for messages")
	f.StringArrayVar(&flavor, "flavor-spec", nil, "new flavor's extra spec `K=V` (repeatable)")
	f.StringVar(&req.ImageName, "image-name", "", "image name, for messages")
	f.StringArrayVar(&image, "image-prop", nil, "image property `K=V` (repeatable)")
	f.BoolVar(&wait, "wait", true, "wait until the host's agent has carried the resize out")
	f.DurationVar(&timeout, "timeout", 2*time.Minute, "how long to wait")
	cmd.AddCommand(
		newResizeEndCommand(g, "confirm", "Make a vTPM's pending resize final (the old TPM, or the vTPM the new flavor has none of, is removed)", (*client.Client).ConfirmResize),
		newResizeEndCommand(g, "revert", "Undo a vTPM's pending resize, restoring exactly the old vTPM", (*client.Client).RevertResize),
	)
	return cmd
}

// newResizeEndCommand builds resize confirm and resize revert: one
// request, then an optional wait until the resize is over.
func newResizeEndCommand(g *globals, name, short string, do func(*client.Client, context.Context, string) (api.VTPM, error)) *cobra.Command {
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
			switch {
			case wait && v.Desired == "deleted":
				// The end of a resize that leaves no vTPM.
				_, err := waitFor(cmd.Context(), c, cmd.ErrOrStderr(), v.InstanceID, timeout, "deleted")
				return err
			case wait:
				v, err = waitResize(cmd.Context(), c, cmd.ErrOrStderr(), v.InstanceID, timeout, func(v api.VTPM) bool {
					return v.Resize == nil && v.Phase != "pending" && v.Phase != "provisioning"
				})
				if err != nil {
					return err
				}
			}
			return printVTPM(cmd.OutOrStdout(), g.format(outputTable), v)
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", true, "wait until the resize is over")
	cmd.Flags().DurationVar(&timeout, "timeout", time.Minute, "how long to wait")
	return cmd
}

// waitResize polls vTPM id until done holds of it, printing each phase and
// resize status it passes through to progress; a vTPM that fails is an
// error.
func waitResize(ctx context.Context, c *client.Client, progress io.Writer, id string, timeout time.Duration, done func(api.VTPM) bool) (api.VTPM, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	v, err := c.Wait(ctx, id, func(v api.VTPM) bool { return done(v) || v.Phase == "error" }, func(v api.VTPM) {
		fmt.Fprintf(progress, "%s  %-12s %-12s %s\n", id, v.Phase, resizeLabel(v.Resize), time.Since(start).Round(time.Millisecond))
	})
	switch {
	case err != nil:
		return v, apiFailure(err)
	case v.Phase == "error":
		return v, cmdline.Exit(ExitFailed, fmt.Errorf("vTPM %s failed: %s", id, v.Reason))
	}
	return v, nil
}

// resizeLabel is "new_tpm resized", or "-" for none.
func resizeLabel(r *api.Resize) string {
	if r == nil {
		return "-"
	}
	return r.Kind + " " + r.Status
}
