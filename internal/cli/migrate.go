package cli

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
)

func newMigrateCommand(g *globals) *cobra.Command {
	var req api.MigrateRequest
	cmd := &cobra.Command{
		Use:   "migrate INSTANCE",
		Short: "Move a vTPM, cold, to another host (the operator's)",
		Long: `migrate moves a vTPM to another host, as Nova's cold migration moves its guest: the vTPM is
stopped, its host's agent exports its state as a sealed bundle, the other host's agent imports it
and proves it is the same TPM (its endorsement keys are the vTPM's record's), and only then does
the vTPM's record name the new host; the old host's copy is removed last. A vTPM that was running
is started again on the new host. --to names the host; without it, placement chooses among the
others. Each step is recorded: if the move is cut short (a crash, a host down), running the same
migrate again finishes it. Progress is printed as the steps' events arrive.`,
		Args: exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			return moveWithProgress(cmd, g, c, args[0], "migrated", func(ctx context.Context) (api.VTPM, error) {
				return c.Migrate(ctx, args[0], req)
			})
		},
	}
	cmd.Flags().StringVar(&req.Host, "to", "", "the host to move it to (default: the one placement chooses)")
	return cmd
}

func newLiveMigrateCommand(g *globals) *cobra.Command {
	var req api.LiveMigrateRequest
	cmd := &cobra.Command{
		Use:   "live-migrate INSTANCE",
		Short: "Move a vTPM with its running guest to another host (the operator's)",
		Long: `live-migrate moves a running guest and its vTPM to another host, as Nova's live migration does,
in every secret-security mode: the other host's agent makes ready to receive it (in libvirt's
emulator mode the libvirt secret, held only as long as the vTPM's secret security allows; in
external mode vtpmd's swtpm, serving before the guest connects), libvirt migrates the guest
peer-to-peer with the TPM state in the migration stream, and only once the guest runs there does
the vTPM's record name the new host; the old host's copy is removed last. If the migration
fails, the guest keeps running where it was, with its TPM, and the other host is cleaned. --to
names the host; without it, placement chooses among the others. Progress is printed as the
steps' events arrive.`,
		Args: exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			return moveWithProgress(cmd, g, c, args[0], "live-migrated", func(ctx context.Context) (api.VTPM, error) {
				return c.LiveMigrate(ctx, args[0], req)
			})
		},
	}
	cmd.Flags().StringVar(&req.Host, "to", "", "the host to move it to (default: the one placement chooses)")
	return cmd
}

// moveWithProgress runs move of the vTPM of id, printing its events as they
// arrive (unless the output is JSON), then done and where the vTPM is.
func moveWithProgress(cmd *cobra.Command, g *globals, c *client.Client, id, done string, move func(context.Context) (api.VTPM, error)) error {
	out := cmd.OutOrStdout()
	progress := g.format(outputTable) != outputJSON
	stop := make(chan struct{})
	followed := make(chan struct{})
	if progress {
		before, err := c.Events(cmd.Context(), id)
		if err != nil {
			return apiFailure(err)
		}
		go func() {
			defer close(followed)
			followEvents(cmd.Context(), c, id, len(before.Items), out, stop)
		}()
	} else {
		close(followed)
	}
	v, err := move(cmd.Context())
	close(stop)
	<-followed
	if err != nil {
		return apiFailure(err)
	}
	if !progress {
		return writeJSON(out, v)
	}
	fmt.Fprintf(out, "%s: the vTPM of %s is on host %s (%s)\n", done, v.InstanceID, v.Host, v.Phase)
	return nil
}

// followEvents prints the events of the vTPM of id after the first seen
// as they arrive, until stop closes.
func followEvents(ctx context.Context, c *client.Client, id string, seen int, w io.Writer, stop <-chan struct{}) {
	show := func() {
		l, err := c.Events(ctx, id)
		if err != nil {
			return
		}
		for _, e := range l.Items[min(seen, len(l.Items)):] {
			fmt.Fprintf(w, "%s  %-20s %s\n", e.At.Local().Format("15:04:05.000"), e.Action, e.Detail)
		}
		seen = max(seen, len(l.Items))
	}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		show()
		select {
		case <-stop:
			show()
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
