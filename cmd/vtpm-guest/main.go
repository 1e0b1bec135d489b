// Command vtpm-guest is vtpmd's in-guest attestation agent: a static binary
// (CGO_ENABLED=0) that registers the guest's TPM with vtpmd and then pushes
// a quote of PCRs 0–9 with the firmware's event log on an interval, and
// at once whenever vtpmd asks for fresh evidence (a long poll).
//
//	vtpm-guest --server http://10.0.2.2:8780 [--instance UUID] [--tpm /dev/tpmrm0] [--interval 30s] [--ima-log PATH] [--once]
//
// The instance id defaults to the machine's SMBIOS UUID, which is the
// instance id under libvirt and Nova.
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
	"github.com/vtpmd/vtpmd/internal/attestor"
)

func main() {
	server := flag.String("server", "http://10.0.2.2:8780", "vtpmd API URL")
	instance := flag.String("instance", "", "instance id (default: the SMBIOS UUID, /sys/class/dmi/id/product_uuid)")
	tpmPath := flag.String("tpm", "/dev/tpmrm0", "TPM device, or unix:PATH for a swtpm data socket")
	eventLog := flag.String("event-log", attestor.DefaultEventLog, "firmware event log")
	caFile := flag.String("ca-file", "", "PEM CAs to trust when the server is https (default: the system's)")
	imaLog := flag.String("ima-log", attestor.DefaultIMALog, "IMA's binary measurement list, sent when present (\"\": never)")
	interval := flag.Duration("interval", 30*time.Second, "time between attestations")
	once := flag.Bool("once", false, "register, attest once and exit")
	flag.Parse()
	api := client.New(*server, "")
	if *caFile != "" {
		pool, err := client.LoadCAs(*caFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "vtpm-guest: --ca-file:", err)
			os.Exit(2)
		}
		api = api.WithTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	}
	if err := run(api, *instance, *tpmPath, *eventLog, *imaLog, *interval, *once); err != nil {
		fmt.Fprintln(os.Stderr, "vtpm-guest:", err)
		os.Exit(1)
	}
}

func run(api *client.Client, instance, tpmPath, eventLog, imaLog string, interval time.Duration, once bool) error {
	if instance == "" {
		b, err := os.ReadFile("/sys/class/dmi/id/product_uuid")
		if err != nil {
			return fmt.Errorf("no --instance and no SMBIOS UUID: %w", err)
		}
		instance = strings.ToLower(strings.TrimSpace(string(b)))
	}
	tpm, err := attestor.OpenTPM(tpmPath)
	if err != nil {
		return err
	}
	defer tpm.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	agent := &attestor.Agent{TPM: tpm, API: api, Subject: client.Instance(instance), EventLog: eventLog, IMALog: imaLog}
	if err := agent.Register(ctx); err != nil {
		return err
	}
	fmt.Printf("vtpm-guest: instance %s registered\n", instance)
	for {
		a, err := agent.Attest(ctx)
		if err != nil {
			fmt.Fprintln(os.Stderr, "vtpm-guest: attesting:", err)
		} else {
			fmt.Printf("vtpm-guest: verdict %s %s\n", a.Verdict, strings.Join(a.Reasons, "; "))
		}
		if once {
			return err
		}
		agent.Wait(ctx, interval)
		if ctx.Err() != nil {
			return nil
		}
	}
}
