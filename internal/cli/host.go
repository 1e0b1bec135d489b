package cli

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/cmdline"
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
		{"BACKEND", orDash([]string{h.Backend})},
		{"STATE", hostState(h)},
		{"USED", strconv.Itoa(h.Used)},
		{"CAPACITY", strconv.Itoa(h.Capacity)},
		{"LAST HEARTBEAT", ago(h.LastHeartbeat)},
		{"VERSION", orDash([]string{h.Version})},
		{"TRAITS", orDash(h.Traits)},
		{"CERTIFICATES", strconv.Itoa(h.Certificates)},
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

// hostAddCommand makes a one-time join token for a host, recording the
// host if it is new. The token goes to stdout alone, or with --token-file
// to a file only its owner can read, never to both.
func hostAddCommand(g *globals) *cobra.Command {
	var ttl time.Duration
	var tokenFile string
	cmd := &cobra.Command{
		Use:   "add HOST",
		Short: "Make a one-time join token the host's agent exchanges for its host certificate (the host reads down until its agent reports)",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			tok, err := g.client().JoinToken(cmd.Context(), args[0], ttl)
			if err != nil {
				return apiFailure(err)
			}
			if tokenFile != "" {
				if err := atomicfile.Write(tokenFile, []byte(tok.Token+"\n"), 0o600); err != nil {
					return cmdline.Exit(ExitFailed, fmt.Errorf("writing the join token: %w", err))
				}
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "host %s: join token written to %s; one use, until %s\n", tok.Host, tokenFile, tok.ExpiresAt.Format(time.RFC3339))
				return err
			}
			if g.format(outputTable) == outputJSON {
				return writeJSON(cmd.OutOrStdout(), tok)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "host %s: join token, one use, until %s\n", tok.Host, tok.ExpiresAt.Format(time.RFC3339))
			_, err = fmt.Fprintln(cmd.OutOrStdout(), tok.Token)
			return err
		},
	}
	cmd.Flags().DurationVar(&ttl, "ttl", 0, "how long the token is valid, 1m to 24h (default: the server's, 1h)")
	cmd.Flags().StringVar(&tokenFile, "token-file", "", "write the token to this file (mode 0600) instead of stdout")
	return cmd
}

// hostRevokeCommand revokes every certificate of a host at once.
func hostRevokeCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "revoke HOST",
		Short: "Stop every certificate of the host at once and delete its unused join tokens; its vTPMs stay",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := g.client().RevokeHost(cmd.Context(), args[0])
			if err != nil {
				return apiFailure(err)
			}
			if g.format(outputTable) == outputJSON {
				return writeJSON(cmd.OutOrStdout(), r)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "host %s: %d certificates revoked, %d unused join tokens deleted; it enrols again only with a new token (vtpmctl host add)\n",
				r.Host, r.Certificates, r.JoinTokens)
			return err
		},
	}
}

// hostShowCommand prints one host.
func hostShowCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "show HOST",
		Short: "Show the host: state, use, capacity, last heartbeat, version, traits, valid host certificates",
		Args:  exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			h, err := g.client().GetHost(cmd.Context(), args[0])
			if err != nil {
				return apiFailure(err)
			}
			return printHost(cmd.OutOrStdout(), g.format(outputTable), h)
		},
	}
}
