package command

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/internal/cmdline"
	"github.com/vtpmd/vtpmd/internal/daemon"
	"github.com/vtpmd/vtpmd/internal/server"
)

// shutdownGrace is how long a stopping role waits for requests in flight
// and for vTPMs to stop.
const shutdownGrace = 15 * time.Second

const configHelp = "Its configuration is the defaults, then --config FILE (YAML, whose keys are the flags' names),\n" +
	"then the flags given; 'vtpmd config print --role ROLE' with the same arguments shows it. A setting\n" +
	"of another role's is refused, as a flag and as a key of the file."

func newAllInOneCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "all-in-one [--config FILE] [flags]",
		Short: "Run the API server and the host agent for this host, in one process",
		Long:  "Run the API server and the host agent for this host, in one process. " + configHelp,
	}
	return roleCommand(cmd, daemon.RoleAllInOne, func(ctx context.Context, cfg daemon.Config, log *slog.Logger) (role, error) {
		d, err := daemon.StartAllInOne(ctx, cfg, log)
		if err != nil {
			return nil, err
		}
		log.Info("vtpmd all-in-one listening", "url", d.URL, "operator", d.OperatorURL, "data_dir", cfg.DataDir)
		fmt.Fprintf(cmd.ErrOrStderr(), `
vtpmd is running. Operator's API: %[1]s (this user only); agents: %[2]s
(Ctrl-C stops it; vTPM state is kept). Try, in another terminal:
  export VTPMD_SERVER=%[1]s
  vtpmctl create --instance $(cat /proc/sys/kernel/random/uuid) --for-project demo --flavor-spec hw:tpm_version=2.0
  vtpmctl list
  vtpmctl identity <instance>
  TPM2TOOLS_TCTI=swtpm:path=<data socket from 'vtpmctl show'> tpm2_pcrread sha256:0-7

`, d.OperatorURL, d.URL)
		return d, nil
	})
}

func newServerCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "server [--config FILE] [flags]",
		Short: "Run the control plane: the API, the store, the key manager and the CAs",
		Long: "Run the control plane: the API, the store, the key manager and the CAs. Hosts' agents\n" +
			"(vtpmd agent) report to it over HTTPS with the certificates it issues them. " + configHelp,
	}
	return roleCommand(cmd, daemon.RoleServer, func(ctx context.Context, cfg daemon.Config, log *slog.Logger) (role, error) {
		s, err := daemon.StartServer(ctx, cfg, log)
		if err != nil {
			return nil, err
		}
		log.Info("vtpmd server listening", "url", s.URL, "operator", s.OperatorURL, "data_dir", cfg.DataDir)
		return serverRole{s}, nil
	})
}

func newAgentCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "agent --server URL [--join-token-file FILE] [--config FILE] [flags]",
		Short: "Run this hypervisor host's agent, reporting to a vtpmd server",
		Long: "Run this hypervisor host's agent, reporting to the vtpmd server at --server. At its first start\n" +
			"it enrols with the join token in --join-token-file ('vtpmctl host add NAME' makes one) and keeps\n" +
			"the host's certificate in the data dir. " + configHelp,
	}
	roleCommand(cmd, daemon.RoleAgent, func(ctx context.Context, cfg daemon.Config, log *slog.Logger) (role, error) {
		if cfg.Server == "" {
			return nil, cmdline.Usagef("vtpmd agent needs the server's URL: --server https://HOST:PORT (and, at its first start, --join-token-file)")
		}
		h, err := daemon.StartAgent(ctx, cfg, log)
		if err != nil {
			return nil, err
		}
		log.Info("vtpmd agent running", "host", cfg.HostName, "server", cfg.Server, "backend", cfg.Backend)
		return h, nil
	})
	cmd.AddCommand(newConfigureHostCommand())
	return cmd
}

// roleCommand makes cmd run a role: its configuration's flags, and a RunE
// that loads the configuration and runs what start starts until the
// command's context ends.
func roleCommand(cmd *cobra.Command, r daemon.Role, start func(context.Context, daemon.Config, *slog.Logger) (role, error)) *cobra.Command {
	cmd.Args = cmdline.NoArgs
	f := bindConfig(cmd, r)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		cfg, err := f.load()
		if err != nil {
			return err
		}
		return runRole(cmd, cfg, func(ctx context.Context, log *slog.Logger) (role, error) { return start(ctx, cfg, log) })
	}
	return cmd
}

// role is a running vtpmd role.
type role interface {
	Run(ctx context.Context) error
	Shutdown(ctx context.Context) error
}

// serverRole runs a server, which has nothing to do but serve.
type serverRole struct{ *daemon.Server }

func (serverRole) Run(ctx context.Context) error {
	<-ctx.Done()
	return nil
}

// runRole starts a role, logging to stderr, and runs it until the
// command's context ends.
func runRole(cmd *cobra.Command, cfg daemon.Config, start func(context.Context, *slog.Logger) (role, error)) error {
	ctx := cmd.Context()
	server.TuneGC()
	log := slog.New(slog.NewJSONHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: cfg.LogLevel}))
	r, err := start(ctx, log)
	if err != nil {
		return err
	}
	runErr := r.Run(ctx)
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
	defer cancel()
	if err := r.Shutdown(sctx); err != nil {
		log.Error("shutdown", "err", err)
	}
	return runErr
}
