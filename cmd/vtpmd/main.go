// Command vtpmd is the vtpmd daemon. `vtpmd all-in-one` runs the API server
// and a host agent for this host in one process.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/backend/libvirt"
	"github.com/vtpmd/vtpmd/internal/backend/xen"
	"github.com/vtpmd/vtpmd/internal/daemon"
	"github.com/vtpmd/vtpmd/internal/spec"
)

func usage() {
	fmt.Fprintf(os.Stderr, `usage: vtpmd all-in-one [flags]
       vtpmd agent configure-host --swtpm-user U --swtpm-group G [--qemu-conf FILE]
       vtpmd xen-uuid-server --listen HOST:PORT [--data-dir DIR] [--group Group1] [--capacity N]

Roles:
  all-in-one             API server and the host agent for this host, in one process
  agent configure-host   set swtpm_user and swtpm_group in libvirt's qemu.conf
  xen-uuid-server        the Xen design's UUID service: GET / registers a fresh vTPM UUID
                         with the VTPM manager group (in-process here: no Xen)

Run 'vtpmd all-in-one -h' for the flags.
`)
}

func main() {
	switch {
	case len(os.Args) >= 3 && os.Args[1] == "agent" && os.Args[2] == "configure-host":
		os.Exit(configureHost(os.Args[3:]))
	case len(os.Args) >= 2 && os.Args[1] == "xen-uuid-server":
		os.Exit(xenUUIDServer(os.Args[2:]))
	case len(os.Args) < 2 || os.Args[1] != "all-in-one":
		usage()
		os.Exit(2)
	}
	var cfg daemon.Config
	var defVersion, level, secretSecurity string
	fs := flag.NewFlagSet("vtpmd all-in-one", flag.ExitOnError)
	fs.StringVar(&cfg.DataDir, "data-dir", "/var/lib/vtpmd", "directory for the store, keys, CA and vTPM states")
	fs.StringVar(&cfg.Listen, "listen", "127.0.0.1:8780", "API address (HOST:PORT) for agents and, with --client-ca, tenants and the operator; beyond loopback it needs --tls-cert and --client-ca")
	fs.BoolVar(&cfg.InsecureListen, "insecure-listen", false, "allow a non-loopback --listen without TLS and client certificates (agents' tokens in the clear)")
	fs.StringVar(&cfg.APISocket, "api-socket", "", "the operator's local API: whoever can connect to this unix socket is the operator (default <data-dir>/api.sock, 0600)")
	fs.StringVar(&cfg.HostName, "host-name", "", "this host's name (default: the OS host name)")
	fs.IntVar(&cfg.Capacity, "capacity", 1000, "how many vTPMs this host takes")
	fs.StringVar(&cfg.SwtpmUser, "swtpm-user", "", "run swtpm as this user (default: vtpmd's)")
	fs.StringVar(&cfg.SwtpmGroup, "swtpm-group", "", "run swtpm as this group (default: vtpmd's)")
	fs.StringVar(&cfg.SocketDir, "socket-dir", "", "put vTPM sockets here, for clients such as QEMU (default: each vTPM's private directory; /run/vtpmd in libvirt's external mode)")
	fs.StringVar(&cfg.SocketGroup, "socket-group", "", "let this group connect to vTPM sockets (default in libvirt's external mode: the group libvirt runs QEMU as)")
	fs.StringVar(&defVersion, "default-tpm-version", "", "give every instance a vTPM of this version (1.2 or 2.0) unless its flavor or image says")
	fs.StringVar(&level, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&cfg.WebhookURL, "webhook-url", "", "POST every attestation verdict change here, as a signed token")
	fs.StringVar(&cfg.HostTPM, "host-tpm", "", "this host's own TPM to attest (/dev/tpmrm0, or unix:PATH of a simulator); empty: the host does not attest")
	fs.StringVar(&cfg.HostEventLog, "host-event-log", "", "the host firmware's event log (default the kernel's)")
	fs.DurationVar(&cfg.HostAttestInterval, "host-attest-interval", 0, "time between host attestations (default 30s)")
	fs.StringVar(&cfg.HostIMALog, "host-ima-log", "", "the host's IMA measurement list to attest with (e.g. /sys/kernel/security/ima/binary_runtime_measurements)")
	fs.DurationVar(&cfg.StaleAfter, "stale-after", 0, "time without evidence after which an attestation verdict turns stale (default 3m)")
	fs.StringVar(&cfg.HostEKCA, "host-ek-ca", "", "PEM file of the CAs whose EK certificates hosts' TPMs may register with")
	fs.IntVar(&cfg.PoolSize, "pool-size", daemon.DefaultPoolSize, "manufactured TPM 2.0s kept ready for new instances (swtpm backend; 0: none)")
	fs.StringVar(&cfg.Backend, "backend", "swtpm", "how this host runs vTPMs: swtpm (vtpmd runs swtpm), libvirt (attached to libvirt domains) or xen (stub domains)")
	fs.StringVar(&cfg.Libvirt.Mode, "libvirt-mode", "emulator", "libvirt backend: emulator (libvirt runs swtpm, as Nova) or external (vtpmd runs swtpm)")
	fs.BoolVar(&cfg.Libvirt.EnableVTPM, "enable-vtpm", false, "libvirt backend: offer vTPMs on this host")
	fs.StringVar(&cfg.Libvirt.Socket, "libvirt-socket", "/var/run/libvirt/libvirt-sock", "libvirt backend: libvirtd's socket")
	fs.StringVar(&secretSecurity, "secret-security", "user,host,deployment", "libvirt backend: secret-security modes offered (comma-separated)")
	fs.StringVar(&cfg.Store, "store", "", "PostgreSQL connection string (postgres://user@host/db; the password in a passfile, never here); default: SQLite in the data dir")
	fs.StringVar(&cfg.TLSCert, "tls-cert", "", "PEM certificate (chain) of the API: with --tls-key, the API speaks only HTTPS")
	fs.StringVar(&cfg.TLSKey, "tls-key", "", "PEM private key of the API's certificate")
	fs.StringVar(&cfg.ClientCA, "client-ca", "", "PEM CAs whose client certificates identify tenants (subject O=<project>) and the operator (O=system:operator); required of them when set (needs --tls-cert)")
	fs.StringVar(&cfg.PublicURL, "public-url", "", "the API's URL as hosts reach it, written into Hyper-V plans (default http://<listen>)")
	fs.StringVar(&cfg.HyperVHGS, "hyperv-hgs-url", "", "Hyper-V plans: the Host Guardian Service's URL (key protectors also name its guardian); default: local key protectors")
	fs.StringVar(&cfg.Xen.ImageDir, "xen-image-dir", "", "xen backend: vTPM stub domains' disks (default /var/lib/xen/images/nova_vtpms)")
	fs.StringVar(&cfg.Xen.ConfigDir, "xen-config-dir", "", "xen backend: their xl and libvirt configurations (default: the image dir)")
	fs.StringVar(&cfg.Xen.Kernel, "xen-stubdom-kernel", "", "xen backend: the vtpm stub domain kernel (default /usr/lib/xen/boot/vtpm-stubdom.gz)")
	fs.StringVar(&cfg.Xen.Manager, "xen-manager", "", "xen backend: the VTPM manager domain's name (default vtpmmgr)")
	fs.StringVar(&cfg.Xen.Group, "xen-group", "Group1", "xen backend: the VTPM manager group vTPMs register to (never Group0)")
	fs.IntVar(&cfg.Xen.GroupCapacity, "xen-group-capacity", xen.DefaultCapacity, "xen backend: vTPMs the group takes (its TPM's NVRAM)")
	fs.StringVar(&cfg.Xen.UUIDListen, "xen-uuid-listen", "", "xen backend: also serve the UUID service on HOST:PORT (the original used :8081)")
	fs.Parse(os.Args[2:])
	cfg.DefaultTPMVersion = spec.Version(defVersion)
	for _, m := range strings.Split(secretSecurity, ",") {
		cfg.Libvirt.SecretSecurity = append(cfg.Libvirt.SecretSecurity, spec.SecretSecurity(strings.TrimSpace(m)))
	}
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
	log.Info("vtpmd all-in-one listening", "url", d.URL, "operator", d.OperatorURL, "data_dir", cfg.DataDir)
	fmt.Fprintf(os.Stderr, `
vtpmd is running. Operator's API: %[1]s (this user only); agents: %[2]s
(Ctrl-C stops it; vTPM state is kept). Try, in another terminal:
  export VTPMD_SERVER=%[1]s
  vtpmctl create --instance $(cat /proc/sys/kernel/random/uuid) --for-project demo --flavor-spec hw:tpm_version=2.0
  vtpmctl list
  vtpmctl identity <instance>
  TPM2TOOLS_TCTI=swtpm:path=<data socket from 'vtpmctl show'> tpm2_pcrread sha256:0-7

`, d.OperatorURL, d.URL)
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

// xenUUIDServer runs the UUID service on its own, over a VTPM manager
// group kept in the data dir.
func xenUUIDServer(args []string) int {
	fs := flag.NewFlagSet("vtpmd xen-uuid-server", flag.ExitOnError)
	listen := fs.String("listen", "", "address to serve on, HOST:PORT (required; the original used :8081)")
	dataDir := fs.String("data-dir", "/var/lib/vtpmd/xen", "where the group's books are kept")
	group := fs.String("group", "Group1", "the VTPM manager group (never Group0)")
	capacity := fs.Int("capacity", xen.DefaultCapacity, "vTPMs the group takes (its TPM's NVRAM)")
	fs.Parse(args)
	if *listen == "" || fs.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "vtpmd xen-uuid-server: --listen HOST:PORT is required, and nothing else")
		return 2
	}
	g, err := xen.OpenGroup(*dataDir, *group, *capacity)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vtpmd: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vtpmd: %v\n", err)
		return 1
	}
	srv := &http.Server{Handler: xen.UUIDServer(g, log), ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	log.Info("Xen UUID service listening", "addr", ln.Addr().String(), "group", g.Name(), "books", *dataDir)
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintf(os.Stderr, "vtpmd: %v\n", err)
		return 1
	}
	return 0
}

// configureHost writes swtpm_user and swtpm_group into libvirt's qemu.conf,
// keeping every other line, and says what it changed.
func configureHost(args []string) int {
	fs := flag.NewFlagSet("vtpmd agent configure-host", flag.ExitOnError)
	user := fs.String("swtpm-user", "", "user libvirt runs swtpm as (required)")
	group := fs.String("swtpm-group", "", "group libvirt runs swtpm as (required)")
	path := fs.String("qemu-conf", libvirt.QEMUConfPath, "libvirt's qemu.conf")
	fs.Parse(args)
	if *user == "" || *group == "" {
		fmt.Fprintln(os.Stderr, "vtpmd agent configure-host: --swtpm-user and --swtpm-group are required")
		return 2
	}
	info, err := os.Stat(*path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vtpmd: %v\n", err)
		return 1
	}
	conf, err := os.ReadFile(*path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vtpmd: %v\n", err)
		return 1
	}
	out, changes, err := libvirt.ConfigureQEMUConf(conf, *user, *group)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vtpmd: %v\n", err)
		return 2
	}
	if len(changes) == 0 {
		fmt.Printf("%s already runs swtpm as %s:%s; nothing changed\n", *path, *user, *group)
		return 0
	}
	if err := atomicfile.Write(*path, out, info.Mode().Perm()); err != nil {
		fmt.Fprintf(os.Stderr, "vtpmd: %v\n", err)
		return 1
	}
	for _, c := range changes {
		fmt.Printf("%s: %s\n", *path, c)
	}
	fmt.Println("restart libvirtd for the change to take effect")
	return 0
}
