package cli

import (
	"context"
	"io"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
)

// drainCommand builds host drain and undrain: one request, then the host
// as it now is.
func drainCommand(g *globals, name, short string, do func(*client.Client, context.Context, string) (api.Host, error)) *cobra.Command {
	return &cobra.Command{
		Use:   name + " HOST",
		Short: short,
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			h, err := do(g.client(), cmd.Context(), args[0])
			if err != nil {
				return apiFailure(err)
			}
			return printHost(cmd.OutOrStdout(), g.format(outputTable), h)
		},
	}
}

func printHost(w io.Writer, format string, h api.Host) error {
	if format == outputJSON {
		return writeJSON(w, h)
	}
	return writeFields(w, [][2]string{
		{"HOST", h.Name},
		{"BACKEND", h.Backend},
		{"STATE", hostState(h)},
		{"USED", strconv.Itoa(h.Used)},
		{"CAPACITY", strconv.Itoa(h.Capacity)},
		{"LAST HEARTBEAT", ago(h.LastHeartbeat)},
		{"VERSION", orDash([]string{h.Version})},
		{"TRAITS", orDash(h.Traits)},
	})
}

// hostState is a host's state, with ",draining" when it is drained but
// reads down.
func hostState(h api.Host) string {
	if h.Draining && h.State != "draining" {
		return h.State + ",draining"
	}
	return h.State
}

// ago says how long before now t was, to the second; "-" for never.
func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return time.Since(t).Round(time.Second).String() + " ago"
}
