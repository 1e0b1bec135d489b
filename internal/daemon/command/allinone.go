package command

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/internal/cmdline"
	"github.com/vtpmd/vtpmd/internal/daemon"
)

// shutdownGrace is how long a stopping all-in-one waits for requests in
// flight and for vTPMs to stop.
const shutdownGrace = 15 * time.Second

func newAllInOneCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "all-in-one [--config FILE] [flags]",
		Short: "Run the API server and the host agent for this host, in one process",
		Long: "Run the API server and the host agent for this host, in one process. Its configuration is\n" +
			"the defaults, then --config FILE (YAML, whose keys are the flags' names), then the flags\n" +
			"given; 'vtpmd config print' with the same arguments shows it.",
		Args: cmdline.NoArgs,
	}
	f := bindConfig(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		cfg, err := f.load()
		if err != nil {
			return err
		}
		return runAllInOne(cmd.Context(), cmd, cfg)
	}
	return cmd
}

// runAllInOne runs vtpmd all-in-one until ctx ends, logging to stderr.
func runAllInOne(ctx context.Context, cmd *cobra.Command, cfg daemon.Config) error {
	stderr := cmd.ErrOrStderr()
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))
	d, err := daemon.StartAllInOne(ctx, cfg, log)
	if err != nil {
		return err
	}
	log.Info("vtpmd all-in-one listening", "url", d.URL, "operator", d.OperatorURL, "data_dir", cfg.DataDir)
	fmt.Fprintf(stderr, `
vtpmd is running. Operator's API: %[1]s (this user only); agents: %[2]s
(Ctrl-C stops it; vTPM state is kept). Try, in another terminal:
  export VTPMD_SERVER=%[1]s
  vtpmctl create --instance $(cat /proc/sys/kernel/random/uuid) --for-project demo --flavor-spec hw:tpm_version=2.0
  vtpmctl list
  vtpmctl identity <instance>
  TPM2TOOLS_TCTI=swtpm:path=<data socket from 'vtpmctl show'> tpm2_pcrread sha256:0-7

`, d.OperatorURL, d.URL)
	runErr := d.Run(ctx)
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
	defer cancel()
	if err := d.Shutdown(sctx); err != nil {
		log.Error("shutdown", "err", err)
	}
	return runErr
}
