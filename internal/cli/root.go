// Package cli is vtpmctl's command tree. Commands write only to the
// command's own output streams, so tests drive them with SetArgs and SetOut.
package cli

import (
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cmdline"
	"github.com/vtpmd/vtpmd/internal/keystone"
)

// Exit statuses of vtpmctl (see cmdline).
const (
	ExitOK     = cmdline.ExitOK
	ExitFailed = cmdline.ExitFailed
	ExitUsage  = cmdline.ExitUsage
)

// Output formats of -o.
const (
	outputJSON  = "json"
	outputTable = "table"
)

// globals are the flags every command shares.
type globals struct {
	output  string
	server  string
	project string
	caFile  string
	cert    string
	key     string
	tls     *tls.Config // when --ca-file or --cert is set
	osCloud string
	// identity is the user's Keystone session (--os-cloud, OS_* variables)
	// when vtpmctl authenticates with a token; nil otherwise.
	identity *keystone.Session
}

// format is -o, or def when the user gave none.
func (g *globals) format(def string) string {
	if g.output == "" {
		return def
	}
	return g.output
}

// NewRootCommand builds vtpmctl's command tree.
func NewRootCommand() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "vtpmctl",
		Short:         "Manage virtual TPMs of cloud instances",
		SilenceErrors: true,
		SilenceUsage:  true,
		Args:          cmdline.NoArgs,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			switch g.output {
			case "", outputJSON, outputTable:
			default:
				return cmdline.Usagef("unknown output format %q (want json or table)", g.output)
			}
			if err := g.openIdentity(); err != nil {
				return err
			}
			if g.caFile == "" && g.cert == "" && g.key == "" {
				return nil
			}
			g.tls = &tls.Config{MinVersion: tls.VersionTLS12}
			if g.caFile != "" {
				pool, err := client.LoadCAs(g.caFile)
				if err != nil {
					return cmdline.Usagef("--ca-file: %v", err)
				}
				g.tls.RootCAs = pool
			}
			if g.cert != "" || g.key != "" {
				pair, err := tls.LoadX509KeyPair(g.cert, g.key)
				if err != nil {
					return cmdline.Usagef("--cert and --key: %v", err)
				}
				g.tls.Certificates = []tls.Certificate{pair}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	pf := root.PersistentFlags()
	pf.StringVarP(&g.output, "output", "o", "", "output format: json or table")
	pf.StringVar(&g.server, "server", envOr(EnvServer, DefaultServer), "vtpmd API URL (env "+EnvServer+")")
	pf.StringVar(&g.project, "project", os.Getenv(EnvProject), "act as this project (tenant) (env "+EnvProject+"); empty: operator")
	pf.StringVar(&g.caFile, "ca-file", os.Getenv(EnvCAFile), "PEM CAs to trust for an https server (env "+EnvCAFile+"); default: the system's")
	pf.StringVar(&g.cert, "cert", os.Getenv(EnvCert), "PEM client certificate that says who you are, for a server that asks for one (env "+EnvCert+")")
	pf.StringVar(&g.key, "key", os.Getenv(EnvKey), "PEM private key of --cert (env "+EnvKey+")")
	pf.StringVar(&g.osCloud, "os-cloud", os.Getenv("OS_CLOUD"), "authenticate with a Keystone token of this clouds.yaml cloud, as the openstack CLI does (env OS_CLOUD; OS_* variables override its values); chosen over --cert")
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return cmdline.Exit(ExitUsage, err)
	})
	root.AddCommand(
		newResolveCommand(g),
		newCreateCommand(g),
		newListCommand(g),
		newShowCommand(g),
		newIdentityCommand(g),
		newActionCommand(g, "start", "Start a stopped vTPM (state kept)", "active", (*client.Client).Start),
		newActionCommand(g, "stop", "Stop a vTPM (state kept)", "stopped", (*client.Client).Stop),
		newActionCommand(g, "delete", "Delete a vTPM, destroying its state and secret", "deleted", (*client.Client).Delete),
		newAttachCommand(g),
		newActionCommand(g, "detach", "Detach a vTPM from its libvirt domain (state kept)", "active", (*client.Client).Detach),
		newAdoptCommand(g),
		newBackupCommand(g),
		newResizeCommand(g),
		newMigrateCommand(g),
		newLiveMigrateCommand(g),
		newShelveCommand(g),
		newUnshelveCommand(g),
		newDoctorCommand(g),
		newAttestationCommand(g),
		newPolicyCommand(g),
		newHyperVCommand(g),
		newSecretCommand(g),
		newHostCommand(g),
		newEventsCommand(g),
		newHostsCommand(g),
		newCACommand(g),
		newBenchCommand(g),
		newConsoleCommand(g),
	)
	return root
}

// Main runs vtpmctl with args and returns its exit status.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return cmdline.Main(ctx, NewRootCommand(), "vtpmctl", args, stdout, stderr)
}

// openIdentity makes the user's Keystone session, without reaching
// Keystone yet: from the --os-cloud (or OS_CLOUD) cloud, or from the OS_*
// variables (OS_AUTH_URL) when no client certificate is given. The
// operator's socket takes no token.
func (g *globals) openIdentity() error {
	if strings.HasPrefix(g.server, "unix://") {
		return nil
	}
	var (
		creds keystone.Credentials
		err   error
	)
	switch {
	case g.osCloud != "":
		creds, _, err = keystone.FromCloudEnv(g.osCloud)
	case g.cert == "" && os.Getenv("OS_AUTH_URL") != "":
		creds, _, err = keystone.FromEnv()
	default:
		return nil
	}
	if err == nil {
		err = creds.Check()
	}
	var client *http.Client
	if err == nil {
		client, err = creds.HTTPClient(30 * time.Second)
	}
	if err != nil {
		return cmdline.Usagef("keystone credentials: %v", err)
	}
	g.identity = keystone.NewSession(creds, client)
	return nil
}
