package command

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/cmdline"
	"github.com/vtpmd/vtpmd/internal/daemon"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// configFlags are the flags of a command that runs on a role's
// configuration: --config FILE, and one flag per setting of the role,
// named as its key. The configuration in effect is daemon.Config's
// defaults, then the file, then the flags given.
type configFlags struct {
	role  daemon.Role
	file  string
	given daemon.Config // the defaults, with the flags given written over them
	flags *pflag.FlagSet
}

// bindConfig adds role's configuration flags to cmd, and only those: the
// flag parser refuses another role's setting, saying whose it is. Their
// defaults, as --help shows them, are daemon.Config's.
func bindConfig(cmd *cobra.Command, role daemon.Role) *configFlags {
	f := &configFlags{role: role, flags: cmd.Flags()}
	f.bind(func(s daemon.Setting) bool { return s.In(role) })
	cmd.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error { return cmdline.Usage(otherRoles(err, role)) })
	return f
}

// otherRoles adds to an unknown flag's error whose setting it is, when it
// is another role's.
func otherRoles(err error, role daemon.Role) error {
	var unknown *pflag.NotExistError
	if !errors.As(err, &unknown) {
		return err
	}
	if roles := daemon.RolesOf(unknown.GetSpecifiedName()); roles != nil {
		return fmt.Errorf("%w: --%s is %s", err, unknown.GetSpecifiedName(), daemon.NotInRole(roles, role))
	}
	return err
}

// bind adds --config and a flag for each setting that take accepts.
func (f *configFlags) bind(take func(daemon.Setting) bool) {
	f.given.Defaults()
	f.flags.StringVar(&f.file, "config", "", "read the configuration from this YAML file, whose keys are these flags' names; flags given override it")
	for _, s := range f.given.Settings() {
		if !take(s) {
			continue
		}
		usage := settingUsage[s.Key]
		if usage == "" {
			panic("vtpmd: setting " + s.Key + " has no usage text")
		}
		switch p := s.Field.(type) {
		case *string:
			f.flags.StringVar(p, s.Key, *p, usage)
		case *spec.Version:
			f.flags.StringVar((*string)(p), s.Key, string(*p), usage)
		case *bool:
			f.flags.BoolVar(p, s.Key, *p, usage)
		case *int:
			f.flags.IntVar(p, s.Key, *p, usage)
		case **int:
			f.flags.IntVar(*p, s.Key, **p, usage)
		case *time.Duration:
			f.flags.DurationVar(p, s.Key, *p, usage)
		case **time.Duration:
			f.flags.DurationVar(*p, s.Key, **p, usage)
		case *slog.Level:
			f.flags.Var(levelValue{p}, s.Key, usage)
		case *[]string:
			f.flags.Var(&listValue[string]{p: p}, s.Key, usage)
		case *[]spec.SecretSecurity:
			f.flags.Var(&listValue[spec.SecretSecurity]{p: p}, s.Key, usage)
		default:
			panic(fmt.Sprintf("vtpmd: setting %s: no flag for a %T", s.Key, p))
		}
	}
}

// settingUsage is each setting's --help text. Defaults are not repeated
// here: --help shows daemon.Config's.
var settingUsage = map[string]string{
	"data-dir":        "directory for the SQLite store, the operator's socket and vTPM states",
	"master-key-file": "file (mode 0600) of the deployment's master key, which seals every key in the store; the same on every server replica (unless set, master.key in the data dir)",
	"listen":          "API address (HOST:PORT) for agents and, with --client-ca, tenants and the operator; beyond loopback it needs --tls-cert and --client-ca",
	"insecure-listen": "allow a non-loopback --listen without TLS and client certificates (agents' tokens in the clear)",
	"api-socket":      "the operator's local API: whoever can connect to this unix socket (0600) is the operator; unless set, api.sock in the data dir",
	"host-name":       "this host's name; unless set, the OS host name",
	"capacity":        "how many vTPMs this host takes",
	"swtpm-user":      "run swtpm as this user (empty: vtpmd's)",
	"swtpm-group":     "run swtpm as this group (empty: vtpmd's)",
	"socket-dir": "put vTPM sockets here, for clients such as QEMU (empty: each vTPM's private directory; " +
		externalDefaults().SocketDir + " in libvirt's external mode)",
	"socket-group":              "let this group connect to vTPM sockets (empty in libvirt's external mode: the group libvirt runs QEMU as)",
	"swtpm-binary":              "the swtpm executable (looked up in PATH unless a path)",
	"pcr-banks":                 "PCR banks allocated in every new TPM 2.0 (sha1, sha256, sha384, sha512; comma-separated)",
	"default-tpm-version":       "give every instance a vTPM of this version (1.2 or 2.0) unless its flavor or image says",
	"ca-organization":           "the organization in the deployment CA's subject",
	"log-level":                 "debug, info, warn or error",
	"webhook-url":               "POST every attestation verdict change here, as a signed token",
	"host-tpm":                  "this host's own TPM to attest (/dev/tpmrm0, or unix:PATH of a simulator); empty: the host does not attest",
	"host-event-log":            "the host firmware's event log",
	"host-attest-interval":      "time between host attestations",
	"host-ima-log":              "the host's IMA measurement list to attest with (e.g. " + attestor.DefaultIMALog + ")",
	"stale-after":               "time without evidence after which an attestation verdict turns stale",
	"heartbeat-interval":        "time between this host's agent's heartbeats",
	"heartbeat-window":          "time without a heartbeat after which a host reads down and takes no new vTPMs (its vTPMs stay)",
	"backup-interval":           "how often every vTPM is backed up (a sealed state bundle in the store), and at every stop; 0: only when asked (off)",
	"backup-keep":               "backups kept of each vTPM (the newest)",
	"host-ek-ca":                "PEM file of the CAs whose EK certificates hosts' TPMs may register with",
	"pool-size":                 "manufactured TPM 2.0s kept ready for new instances (swtpm backend; 0: none)",
	"backend":                   "how this host runs vTPMs: swtpm (vtpmd runs swtpm), libvirt (attached to libvirt domains) or xen (stub domains)",
	"libvirt-mode":              "libvirt backend: emulator (libvirt runs swtpm, as Nova) or external (vtpmd runs swtpm)",
	"enable-vtpm":               "libvirt backend: offer vTPMs on this host",
	"libvirt-socket":            "libvirt backend: libvirtd's socket",
	"libvirt-migration-uri":     "libvirt backend: how the other hosts' libvirtd reach this host's to live-migrate guests here (qemu+tcp://HOST/system); empty: none",
	"secret-security":           "libvirt backend: secret-security modes offered (comma-separated)",
	"xen-image-dir":             "xen backend: vTPM stub domains' disks (empty: the Xen design's place)",
	"xen-config-dir":            "xen backend: their xl and libvirt configurations (empty: the image dir)",
	"xen-stubdom-kernel":        "xen backend: the vtpm stub domain kernel (empty: the Xen design's)",
	"xen-manager":               "xen backend: the VTPM manager domain's name (empty: the Xen design's)",
	"xen-group":                 "xen backend: the VTPM manager group vTPMs register to (never Group0)",
	"xen-group-capacity":        "xen backend: vTPMs the group takes (its TPM's NVRAM)",
	"xen-uuid-listen":           "xen backend: also serve the UUID service on HOST:PORT (the original used :8081)",
	"store":                     "PostgreSQL connection string (postgres://user@host/db; the password in a passfile, never here); empty: SQLite in the data dir",
	"server":                    "vtpmd agent: the control plane's https:// URL",
	"server-ca":                 "vtpmd agent: PEM CAs the server's TLS certificate chains to (empty: the system's)",
	"join-token-file":           "vtpmd agent: file holding the one-time join token (vtpmctl host add) for the host's first start",
	"tls-cert":                  "PEM certificate (chain) of the API: with --tls-key, the API speaks only HTTPS",
	"tls-key":                   "PEM private key of the API's certificate",
	"client-ca":                 "PEM CAs whose client certificates identify tenants (subject O=<project>) and the operator (O=system:operator); required of them when set (needs --tls-cert)",
	"key-manager":               "where vTPMs' and tenants' secrets are kept: embedded (sealed under the master key in the store) or barbican (OpenStack's key manager, as Nova keeps them)",
	"barbican-url":              "--key-manager barbican: Barbican's URL (empty: the Keystone catalog's key-manager endpoint)",
	"auth":                      "how tenants and the operator prove themselves on --listen: certificates (--client-ca) or keystone (X-Auth-Token; certificates too with --client-ca)",
	"keystone-url":              "--auth keystone: Keystone's identity URL (http://keystone:5000/v3), where tokens are validated",
	"keystone-credentials-file": "--auth keystone: vtpmd's service user, a clouds.yaml cloud entry (auth:, region_name) in a file of mode 0600",
	"keystone-admin-project":    "--auth keystone: the project (ID, or name in the Default domain) whose admins are the operator",
	"keystone-cache-ttl":        "--auth keystone: how long a token's validation is reused; a revoked token is refused at most this long after",
	"public-url":                "the API's URL as hosts reach it, written into Hyper-V plans (empty: http://<listen>)",
	"hyperv-hgs-url":            "Hyper-V plans: the Host Guardian Service's URL (key protectors also name its guardian); empty: local key protectors",
}

// externalDefaults is the default configuration of libvirt's external
// mode, whose defaults differ.
func externalDefaults() daemon.Config {
	c := daemon.Config{Backend: "libvirt", Libvirt: daemon.LibvirtConfig{Mode: "external"}}
	c.Defaults()
	return c
}

// load returns the configuration in effect, defaulted and valid. A bad
// file or an invalid configuration is a usage error, listing every
// problem.
func (f *configFlags) load() (daemon.Config, error) {
	var cfg daemon.Config
	if f.file != "" {
		data, err := os.ReadFile(f.file)
		if err != nil {
			return cfg, cmdline.Usage(err)
		}
		if cfg, err = daemon.ParseConfig(data, f.role); err != nil {
			return cfg, cmdline.Usagef("%s:%s", f.file, listed(err))
		}
	}
	into := cfg.Settings()
	for i, s := range f.given.Settings() {
		if f.flags.Changed(s.Key) {
			reflect.ValueOf(into[i].Field).Elem().Set(reflect.ValueOf(s.Field).Elem())
		}
	}
	if f.flags.Changed("data-dir") { // relative to where vtpmd was started
		if abs, err := filepath.Abs(cfg.DataDir); err == nil {
			cfg.DataDir = abs
		}
	}
	cfg.Defaults()
	if err := cfg.ValidateRole(f.role); err != nil {
		return cfg, cmdline.Usagef("invalid configuration:%s", listed(err))
	}
	return cfg, nil
}

// listed formats err to follow a colon: on the same line, or when it
// joins several, one per indented line.
func listed(err error) string {
	joined, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return " " + err.Error()
	}
	var b strings.Builder
	for _, e := range joined.Unwrap() {
		b.WriteString("\n  " + e.Error())
	}
	return b.String()
}

// listValue is a flag of comma-separated values: the first time it is
// given it replaces the default, later times add to it.
type listValue[T ~string] struct {
	p   *[]T
	set bool
}

func (v *listValue[T]) Set(s string) error {
	var l []T
	for _, e := range strings.Split(s, ",") {
		l = append(l, T(strings.TrimSpace(e)))
	}
	if !v.set {
		*v.p, v.set = nil, true
	}
	*v.p = append(*v.p, l...)
	return nil
}

func (v *listValue[T]) String() string {
	s := make([]string, len(*v.p))
	for i, e := range *v.p {
		s[i] = string(e)
	}
	return strings.Join(s, ",")
}

func (v *listValue[T]) Type() string { return "list" }

// levelValue is a log level flag, shown in lower case as it is written.
type levelValue struct{ p *slog.Level }

func (v levelValue) Set(s string) error { return v.p.UnmarshalText([]byte(s)) }
func (v levelValue) String() string     { return strings.ToLower(v.p.String()) }
func (v levelValue) Type() string       { return "level" }

func newConfigPrintCommand() *cobra.Command {
	var role string
	cmd := &cobra.Command{
		Use:   "print [--role server|agent|all-in-one] [--config FILE] [flags]",
		Short: "Print the configuration a vtpmd role would run with, secrets redacted",
		Long: "Print the configuration that vtpmd ROLE (--role, default all-in-one) would run with (the defaults,\n" +
			"then --config FILE, then the flags given) as a configuration file: the role's settings only. A flag\n" +
			"or key of another role's is refused, as the role refuses it. Whatever may be a secret reads\n" +
			daemon.Redacted + ": any password, and the webhook URL's path and query.",
		Args: cmdline.NoArgs,
	}
	// Every role's flags are here; those of a role other than --role are
	// refused once --role is known.
	f := &configFlags{flags: cmd.Flags()}
	f.bind(func(daemon.Setting) bool { return true })
	cmd.Flags().StringVar(&role, "role", string(daemon.RoleAllInOne), "the role whose configuration to print: server, agent or all-in-one")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		r, err := daemon.ParseRole(role)
		if err != nil {
			return cmdline.Usage(err)
		}
		f.role = r
		var others []string
		for _, s := range f.given.Settings() {
			if f.flags.Changed(s.Key) && !s.In(r) {
				others = append(others, fmt.Sprintf("--%s is %s", s.Key, daemon.NotInRole(s.Roles, r)))
			}
		}
		if len(others) > 0 {
			return cmdline.Usagef("%s", strings.Join(others, "; "))
		}
		cfg, err := f.load()
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		fmt.Fprintf(out, "# vtpmd %s's configuration in effect; secrets read %s.\n", r, daemon.Redacted)
		_, err = out.Write(daemon.FormatConfig(cfg.Redacted(), r))
		return err
	}
	return cmd
}
