// Command vtpmd is the vtpmd daemon. `vtpmd all-in-one` runs the API server
// and a host agent for this host in one process; `vtpmd --help` lists the
// rest. The command tree is internal/daemon/command.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/vtpmd/vtpmd/internal/daemon/command"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := command.Main(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
