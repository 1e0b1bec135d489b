// Command vtpmd is the vtpmd daemon. `vtpmd all-in-one` runs the API server
// and a host agent for this host in one process.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/daemon"
	"github.com/vtpmd/vtpmd/internal/spec"
)

func usage() {
	fmt.Fprintf(os.Stderr, `usage: vtpmd all-in-one [flags]

Roles:
  all-in-one   API server and the host agent for this host, in one process

Run 'vtpmd all-in-one -h' for the flags.
`)
}

func main() {
	if len(os.Args) < 2 || os.Args[1] != "all-in-one" {
		usage()
		os.Exit(2)
	}
	var cfg daemon.Config
	var defVersion, level string
	fs := flag.NewFlagSet("vtpmd all-in-one", flag.ExitOnError)
	fs.StringVar(&cfg.DataDir, "data-dir", "/var/lib/vtpmd", "directory for the store, keys, CA and vTPM states")
	fs.StringVar(&cfg.Listen, "listen", "127.0.0.1:8780", "API address (HOST:PORT)")
	fs.StringVar(&cfg.HostName, "host-name", "", "this host's name (default: the OS host name)")
	fs.IntVar(&cfg.Capacity, "capacity", 1000, "how many vTPMs this host takes")
	fs.StringVar(&cfg.SwtpmUser, "swtpm-user", "", "run swtpm as this user (default: vtpmd's)")
	fs.StringVar(&cfg.SwtpmGroup, "swtpm-group", "", "run swtpm as this group (default: vtpmd's)")
	fs.StringVar(&defVersion, "default-tpm-version", "", "give every instance a vTPM of this version (1.2 or 2.0) unless its flavor or image says")
	fs.StringVar(&level, "log-level", "info", "debug, info, warn or error")
	fs.Parse(os.Args[2:])
	cfg.DefaultTPMVersion = spec.Version(defVersion)
	if abs, err := filepath.Abs(cfg.DataDir); err == nil {
		cfg.DataDir = abs
	}

	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		fmt.Fprintf(os.Stderr, "vtpmd: -log-level %q: %v\n", level, err)
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	d, err := daemon.StartAllInOne(ctx, cfg, log)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vtpmd: %v\n", err)
		os.Exit(1)
	}
	log.Info("vtpmd all-in-one listening", "addr", d.Addr, "data_dir", cfg.DataDir)
	fmt.Fprintf(os.Stderr, `
vtpmd is running. API: http://%[1]s   (Ctrl-C stops it; vTPM state is kept)
Try, in another terminal:
  export VTPMD_SERVER=http://%[1]s
  vtpmctl create --instance $(cat /proc/sys/kernel/random/uuid) --for-project demo --flavor-spec hw:tpm_version=2.0
  vtpmctl list
  vtpmctl identity <instance>
  TPM2TOOLS_TCTI=swtpm:path=<data socket from 'vtpmctl show'> tpm2_pcrread sha256:0-7

`, d.Addr)
	runErr := d.Run(ctx)
	sctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := d.Shutdown(sctx); err != nil {
		log.Error("shutdown", "err", err)
	}
	if runErr != nil {
		fmt.Fprintf(os.Stderr, "vtpmd: %v\n", runErr)
		os.Exit(1)
	}
}
