package command

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/internal/backend/xen"
	"github.com/vtpmd/vtpmd/internal/cmdline"
	"github.com/vtpmd/vtpmd/internal/daemon"
)

func newXenUUIDServerCommand() *cobra.Command {
	// Where all-in-one's Xen backend keeps the group, by default.
	var def daemon.Config
	def.Defaults()
	var listen, dataDir, group string
	var capacity int
	cmd := &cobra.Command{
		Use:   "xen-uuid-server --listen HOST:PORT [flags]",
		Short: "Serve the Xen design's UUID service: GET / registers a fresh vTPM UUID with the VTPM manager group",
		Long: "Serve the Xen design's UUID service on its own: GET / registers a fresh vTPM UUID with the\n" +
			"VTPM manager group, whose books are kept in the data dir (in-process here: no Xen).",
		Args: cmdline.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if listen == "" {
				return cmdline.Usagef("--listen HOST:PORT is required")
			}
			g, err := xen.OpenGroup(dataDir, group, capacity)
			if err != nil {
				return cmdline.Usage(err)
			}
			return serveUUIDs(cmd.Context(), cmd, listen, g, dataDir)
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&listen, "listen", "", "address to serve on, HOST:PORT (required; the original used :8081)")
	fs.StringVar(&dataDir, "data-dir", filepath.Join(def.DataDir, "xen"), "where the group's books are kept")
	fs.StringVar(&group, "group", def.Xen.Group, "the VTPM manager group (never Group0)")
	fs.IntVar(&capacity, "capacity", def.Xen.GroupCapacity, "vTPMs the group takes (its TPM's NVRAM)")
	return cmd
}

// serveUUIDs serves the UUID service over g on addr until ctx ends.
func serveUUIDs(ctx context.Context, cmd *cobra.Command, addr string, g *xen.Group, books string) error {
	log := slog.New(slog.NewJSONHandler(cmd.ErrOrStderr(), nil))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: xen.UUIDServer(g, log), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	log.Info("Xen UUID service listening", "addr", ln.Addr().String(), "group", g.Name(), "books", books)
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
