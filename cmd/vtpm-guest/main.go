// Command vtpm-guest is vtpmd's in-guest agent: a static binary
// (CGO_ENABLED=0) that registers the guest's TPM with vtpmd and then pushes
// a quote of PCRs 0–9 with the firmware's event log on an interval, and
// at once whenever vtpmd asks for fresh evidence (a long poll). With
// watch, a secret vtpmd revokes (the key broker: the VM or its host
// stopped being trusted) makes it run the tenant's action and forget the
// secret. secret get fetches a secret, which only this guest's TPM opens.
//
//	vtpm-guest [watch --on-revoke CMD] --server http://10.0.2.2:8780 [--instance UUID] [--tpm /dev/tpmrm0] [--interval 30s] [--ima-log PATH] [--state-dir /run/vtpm-guest] [--once]
//	vtpm-guest secret get NAME [--out FILE|-] --server URL [--instance UUID] [--tpm /dev/tpmrm0] [--state-dir /run/vtpm-guest]
//
// The instance id defaults to the machine's SMBIOS UUID, which is the
// instance id under libvirt and Nova. secret get uses the registration of
// the running agent (its token in --state-dir, a memory file system):
// write --out only to a memory file system too (the default, -, is
// standard output), as the agent overwrites and removes it on revocation.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/keyrelease"
)

// common are the flags of every mode.
type common struct {
	server, instance, tpmPath, caFile, stateDir string
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.server, "server", "http://10.0.2.2:8780", "vtpmd API URL")
	fs.StringVar(&c.instance, "instance", "", "instance id (default: the SMBIOS UUID, /sys/class/dmi/id/product_uuid)")
	fs.StringVar(&c.tpmPath, "tpm", "/dev/tpmrm0", "TPM device, or unix:PATH for a swtpm data socket")
	fs.StringVar(&c.caFile, "ca-file", "", "PEM CAs to trust when the server is https (default: the system's)")
	fs.StringVar(&c.stateDir, "state-dir", keyrelease.DefaultHolderDir, "the agent's private directory on a memory file system: its token, where secrets were written")
}

func main() {
	args := os.Args[1:]
	var err error
	switch {
	case len(args) >= 2 && args[0] == "secret" && args[1] == "get":
		err = secretGet(args[2:])
	case len(args) >= 1 && args[0] == "watch":
		err = agent(args[1:], true)
	default:
		err = agent(args, false)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vtpm-guest:", err)
		os.Exit(1)
	}
}

func (c *common) client() (*client.Client, error) {
	api := client.New(c.server, "")
	if c.caFile != "" {
		pool, err := client.LoadCAs(c.caFile)
		if err != nil {
			return nil, fmt.Errorf("--ca-file: %w", err)
		}
		api = api.WithTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	}
	if c.instance == "" {
		b, err := os.ReadFile("/sys/class/dmi/id/product_uuid")
		if err != nil {
			return nil, fmt.Errorf("no --instance and no SMBIOS UUID: %w", err)
		}
		c.instance = strings.ToLower(strings.TrimSpace(string(b)))
	}
	return api, nil
}

// parse parses args with fs, flags and operands in any order.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var operands []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return operands, nil
		}
		operands, args = append(operands, fs.Arg(0)), fs.Args()[1:]
	}
}

// agent registers and attests on the interval and whenever vtpmd asks;
// with watch, it runs onRevoke for each secret vtpmd revokes and forgets
// the secret.
func agent(args []string, watch bool) error {
	fs := flag.NewFlagSet("vtpm-guest", flag.ExitOnError)
	var c common
	c.register(fs)
	eventLog := fs.String("event-log", attestor.DefaultEventLog, "firmware event log")
	imaLog := fs.String("ima-log", attestor.DefaultIMALog, "IMA's binary measurement list, sent when present (\"\": never)")
	interval := fs.Duration("interval", 30*time.Second, "time between attestations")
	once := fs.Bool("once", false, "register, attest once and exit")
	var onRevoke string
	if watch {
		fs.StringVar(&onRevoke, "on-revoke", "", "command (sh -c) to run when vtpmd revokes a secret, with VTPM_SECRET=NAME; e.g. close a LUKS mapping")
	}
	if rest, err := parse(fs, args); err != nil {
		return err
	} else if len(rest) > 0 {
		return fmt.Errorf("unexpected arguments %q", rest)
	}
	api, err := c.client()
	if err != nil {
		return err
	}
	tpm, err := attestor.OpenTPM(c.tpmPath)
	if err != nil {
		return err
	}
	defer tpm.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a := &attestor.Agent{TPM: tpm, API: api, Subject: client.Instance(c.instance), EventLog: *eventLog, IMALog: *imaLog}
	if err := a.Register(ctx); err != nil {
		return err
	}
	defer a.Flush() // a TPM without a resource manager (unix:, /dev/tpm0) keeps them
	holder := keyrelease.Holder{Dir: c.stateDir}
	if err := holder.SaveToken(a.Token()); err != nil {
		fmt.Fprintln(os.Stderr, "vtpm-guest: keeping the agent token (secret get will not work):", err)
	}
	fmt.Printf("vtpm-guest: instance %s registered\n", c.instance)
	for {
		v, err := a.Attest(ctx)
		if err != nil {
			fmt.Fprintln(os.Stderr, "vtpm-guest: attesting:", err)
		} else {
			fmt.Printf("vtpm-guest: verdict %s %s\n", v.Verdict, strings.Join(v.Reasons, "; "))
		}
		if *once {
			return err
		}
		for _, name := range a.Wait(ctx, *interval) {
			fmt.Printf("vtpm-guest: secret %s revoked\n", name)
			if err := holder.Revoke(ctx, name, onRevoke, os.Stdout); err != nil {
				fmt.Fprintln(os.Stderr, "vtpm-guest:", err)
			}
		}
		if ctx.Err() != nil {
			return nil
		}
	}
}

// secretGet fetches secret NAME through the running agent's registration
// and writes it to --out.
func secretGet(args []string) error {
	fs := flag.NewFlagSet("vtpm-guest secret get", flag.ExitOnError)
	var c common
	c.register(fs)
	out := fs.String("out", "-", "where to write the secret: a file (on a memory file system), or - for standard output")
	rest, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(rest) != 1 {
		return fmt.Errorf("secret get takes one secret name, got %q", rest)
	}
	name := rest[0]
	api, err := c.client()
	if err != nil {
		return err
	}
	holder := keyrelease.Holder{Dir: c.stateDir}
	token, err := holder.Token()
	if err != nil {
		return err
	}
	tpm, err := attestor.OpenTPM(c.tpmPath)
	if err != nil {
		return err
	}
	defer tpm.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a := &attestor.Agent{TPM: tpm, API: api, Subject: client.Instance(c.instance)}
	if err := a.Resume(token); err != nil {
		return err
	}
	defer a.Flush()
	payload, _, err := keyrelease.Fetch(ctx, a, c.instance, name)
	if err != nil {
		return fmt.Errorf("secret %s: %w", name, err)
	}
	defer clear(payload)
	if *out == "-" {
		_, err := os.Stdout.Write(payload)
		return err
	}
	if err := atomicfile.Write(*out, payload, 0o600); err != nil {
		return err
	}
	return holder.Remember(name, *out)
}
