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
			c, out := g.client(), cmd.OutOrStdout()
			progress := g.format(outputTable) != outputJSON
			stop := make(chan struct{})
			followed := make(chan struct{})
			if progress {
				before, err := c.Events(cmd.Context(), args[0])
				if err != nil {
					return apiFailure(err)
				}
				go func() {
					defer close(followed)
					followEvents(cmd.Context(), c, args[0], len(before.Items), out, stop)
				}()
			} else {
				close(followed)
			}
			v, err := c.Migrate(cmd.Context(), args[0], req)
			close(stop)
			<-followed
			if err != nil {
				return apiFailure(err)
			}
			if !progress {
				return writeJSON(out, v)
			}
			fmt.Fprintf(out, "migrated: the vTPM of %s is on host %s (%s)\n", v.InstanceID, v.Host, v.Phase)
			return nil
		},
	}
	cmd.Flags().StringVar(&req.Host, "to", "", "the host to move it to (default: the one placement chooses)")
	return cmd
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
