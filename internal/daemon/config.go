// Package daemon assembles vtpmd's roles from their parts: the server
// (StartServer: API, store, key manager, CAs), a host's agent (StartAgent:
// enrolment, the agent protocol over mTLS, the host's backend), and
// all-in-one (StartAllInOne: a server and one agent in a process, the
// agent on the server's records in-process through the same agent.Records
// contract a remote agent uses over HTTPS).
package daemon

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/backend/libvirt"
	"github.com/vtpmd/vtpmd/internal/backend/xen"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
)

// Config is vtpmd's configuration. The zero value plus a DataDir is valid:
// Defaults fills in everything else, and is the one place that states a
// default.
//
// Each field is a key of the configuration file (YAML, see ParseConfig)
// and a flag of the same name: the yaml tag names both. Its roles tag
// names the roles (server, agent, all-in-one) that use it: only those
// take it, as a flag or as a key of their file.
type Config struct {
	// DataDir holds the SQLite store, the operator's socket, the master key
	// file and the vTPM states. Default /var/lib/vtpmd.
	DataDir string `yaml:"data-dir" roles:"server,agent,all-in-one"`
	// MasterKeyFile holds the deployment's master key (32 bytes, mode
	// 0600), which seals every key in the store: the key manager's
	// secrets, the CAs', the verdict signing key. Every server replica of
	// a deployment needs the same one (docs/deployment.md). Default
	// <DataDir>/master.key, made at the first start on an empty store.
	MasterKeyFile string `yaml:"master-key-file" roles:"server,all-in-one"`
	// KeyManager keeps the vTPMs' and tenants' secrets: "embedded"
	// (default: sealed under the master key in the store) or "barbican"
	// (OpenStack's key manager, as Nova keeps them; needs
	// KeystoneURL and KeystoneCredentialsFile). The deployment's own keys
	// stay sealed under the master key either way.
	KeyManager string `yaml:"key-manager" roles:"server,all-in-one"`
	// BarbicanURL is Barbican's endpoint; "" takes the key-manager
	// endpoint of the Keystone catalog, as the service user sees it.
	BarbicanURL string `yaml:"barbican-url" roles:"server,all-in-one"`
	// Listen is the API's network address. Default 127.0.0.1:8780. Callers
	// on it are agents (tokens, TPM proofs) and, with ClientCA, tenants and
	// the operator by certificate; never anyone unauthenticated. Any other
	// than a loopback address needs TLS and ClientCA, or InsecureListen.
	Listen string `yaml:"listen" roles:"server,all-in-one"`
	// InsecureListen allows a non-loopback Listen without TLS and client
	// certificates: agents' tokens then cross the network in the clear.
	// Default off; vtpmd logs a warning when it is on.
	InsecureListen bool `yaml:"insecure-listen" roles:"server,all-in-one"`
	// APISocket is the operator's local API: whoever can connect to this
	// unix socket is the operator (vtpmctl --server unix://PATH). Default
	// <DataDir>/api.sock, mode 0600 in the 0700 data dir: vtpmd's user only.
	APISocket string `yaml:"api-socket" roles:"server,all-in-one"`
	// HostName names this host to the scheduler. Default: the OS host name.
	HostName string `yaml:"host-name" roles:"agent,all-in-one"`
	// Capacity is how many vTPMs this host takes. Default 1000.
	Capacity int `yaml:"capacity" roles:"agent,all-in-one"`
	// SwtpmUser and SwtpmGroup run swtpm; empty (the default) means vtpmd's
	// own user and group.
	SwtpmUser  string `yaml:"swtpm-user" roles:"agent,all-in-one"`
	SwtpmGroup string `yaml:"swtpm-group" roles:"agent,all-in-one"`
	// SocketDir holds vtpmd's swtpm sockets when clients other than
	// vtpmd's user must connect: QEMU, under libvirt in external mode
	// (default there /run/vtpmd). Default elsewhere: each vTPM's private
	// state directory.
	SocketDir string `yaml:"socket-dir" roles:"agent,all-in-one"`
	// SocketGroup may connect to those sockets. Default in libvirt's
	// external mode: the group libvirt runs QEMU as, asked of libvirtd.
	SocketGroup string `yaml:"socket-group" roles:"agent,all-in-one"`
	// SwtpmBinary is the swtpm executable. Default "swtpm" from PATH.
	SwtpmBinary string `yaml:"swtpm-binary" roles:"agent,all-in-one"`
	// PCRBanks are allocated in every new TPM 2.0. Default ["sha256"].
	PCRBanks []string `yaml:"pcr-banks" roles:"agent,all-in-one"`
	// DefaultTPMVersion gives instances whose flavor and image ask for no
	// vTPM one of this version. Default "" (off).
	DefaultTPMVersion spec.Version `yaml:"default-tpm-version" roles:"server,all-in-one"`
	// CAOrganization appears in the deployment CA's subject. Default "vtpmd".
	CAOrganization string `yaml:"ca-organization" roles:"server,all-in-one"`
	// LogLevel is the least level logged. Default info (the zero value).
	LogLevel slog.Level `yaml:"log-level" roles:"server,agent,all-in-one"`
	// WebhookURL receives every attestation verdict change, signed; "" for
	// none. Its path and query may carry a token: Redacted hides them.
	WebhookURL string `yaml:"webhook-url" roles:"server,all-in-one"`
	// HostTPM is this host's own TPM, attested to the verifier so that
	// instances' verdicts carry their host's: a device (/dev/tpmrm0) or
	// unix:PATH (a TPM simulator's data socket); "" for none.
	HostTPM string `yaml:"host-tpm" roles:"agent,all-in-one"`
	// HostEventLog is the host firmware's event log. Default the kernel's
	// (attestor.DefaultEventLog).
	HostEventLog string `yaml:"host-event-log" roles:"agent,all-in-one"`
	// HostAttestInterval is the time between host attestations. Default 30s.
	HostAttestInterval time.Duration `yaml:"host-attest-interval" roles:"agent,all-in-one"`
	// HostIMALog is the host's IMA measurement list, sent with its
	// evidence when set (attestor.DefaultIMALog on a host running IMA).
	HostIMALog string `yaml:"host-ima-log" roles:"agent,all-in-one"`
	// StaleAfter is how long an attesting instance or host may go without
	// evidence before its verdict turns stale. Default
	// verifier.DefaultStaleAfter (3m).
	StaleAfter time.Duration `yaml:"stale-after" roles:"server,all-in-one"`
	// HeartbeatInterval is the time between this host's agent's
	// heartbeats. Default agent.DefaultHeartbeatInterval (10s).
	HeartbeatInterval time.Duration `yaml:"heartbeat-interval" roles:"agent,all-in-one"`
	// HeartbeatWindow is how long a host's agent may go without a
	// heartbeat before the host reads down and takes no new vTPMs (its
	// vTPMs stay). Default vtpms.DefaultHeartbeatWindow (60s).
	HeartbeatWindow time.Duration `yaml:"heartbeat-window" roles:"server,all-in-one"`
	// BackupInterval is how often the servers back up every vTPM (a state
	// bundle the store keeps); while it is on, each vTPM is backed up also
	// when it stops. Default (nil) DefaultBackupInterval (1h); 0 is off:
	// backups only when asked (vtpmctl backup create), and an evacuation
	// finds none.
	BackupInterval *time.Duration `yaml:"backup-interval" roles:"server,all-in-one"`
	// BackupKeep is how many backups of each vTPM are kept, the newest.
	// Default vtpms.DefaultBackupKeep (3).
	BackupKeep int `yaml:"backup-keep" roles:"server,all-in-one"`
	// HostEKCA is a PEM file of the CAs (TPM vendors', or the operator's)
	// whose EK certificates hosts' TPMs may register with; "" for none.
	HostEKCA string `yaml:"host-ek-ca" roles:"server,all-in-one"`
	// PoolSize is how many manufactured TPM 2.0s the swtpm backend keeps
	// ready for new instances, so that a burst of creates costs a swtpm
	// start each, not a manufacture; 0 makes every TPM on demand. Default
	// (nil) 4.
	PoolSize *int `yaml:"pool-size" roles:"agent,all-in-one"`

	// Backend is how this host runs vTPMs: "swtpm" (default; vtpmd runs
	// swtpm, reachable over unix sockets), "libvirt" (attached to libvirt
	// domains) or "xen" (vtpm stub domains under the VTPM manager).
	Backend string `yaml:"backend" roles:"agent,all-in-one"`
	// Libvirt configures the libvirt backend.
	Libvirt LibvirtConfig `yaml:",inline"`
	// Xen configures the Xen backend.
	Xen XenConfig `yaml:",inline"`
	// Store is a PostgreSQL connection string (URL or key=value pairs);
	// "" keeps the store in SQLite under DataDir. A password never goes in
	// it: libpq's passfile (PGPASSFILE, ~/.pgpass) holds it.
	Store string `yaml:"store" roles:"server,all-in-one"`
	// Server is the control plane a host's agent (vtpmd agent) reports
	// to: its API's https:// URL.
	Server string `yaml:"server" roles:"agent"`
	// ServerCA is a PEM file of the CAs the server's TLS certificate
	// chains to, for vtpmd agent; "" trusts the system's.
	ServerCA string `yaml:"server-ca" roles:"agent"`
	// JoinTokenFile holds the one-time join token (vtpmctl host add) that
	// vtpmd agent exchanges at its first start for the host's certificate,
	// kept in <DataDir>/host-cert from then on; the file may then go.
	JoinTokenFile string `yaml:"join-token-file" roles:"agent"`
	// TLSCert and TLSKey are PEM files of the API's certificate (chain)
	// and key: with them the API speaks only HTTPS, and hosts' agents call
	// it with the client certificates the host CA issued them at
	// enrolment.
	TLSCert string `yaml:"tls-cert" roles:"server,all-in-one"`
	TLSKey  string `yaml:"tls-key" roles:"server,all-in-one"`
	// ClientCA is a PEM file of the CAs whose client certificates identify
	// tenants (the subject's organization is the project) and the operator
	// (organization system:operator) on the network address. Needs TLS.
	// "": tenants and the operator are served on APISocket only.
	ClientCA string `yaml:"client-ca" roles:"server,all-in-one"`
	// Auth is how tenants and the operator prove themselves on the network
	// address: "certificates" (default: client certificates, see
	// ClientCA) or "keystone" (Keystone tokens in X-Auth-Token, and
	// client certificates too when ClientCA is set). Hosts' agents keep
	// their certificates and the operator's socket stays the operator's
	// either way.
	Auth string `yaml:"auth" roles:"server,all-in-one"`
	// KeystoneURL is Keystone's identity endpoint
	// (http://keystone:5000/v3), where vtpmd validates tokens; with Auth
	// keystone. It replaces the credentials file's auth_url.
	KeystoneURL string `yaml:"keystone-url" roles:"server,all-in-one"`
	// KeystoneCredentialsFile holds vtpmd's own Keystone service user (a
	// clouds.yaml cloud entry: auth:, region_name; mode 0600), whose
	// token validates callers' tokens; with Auth keystone.
	KeystoneCredentialsFile string `yaml:"keystone-credentials-file" roles:"server,all-in-one"`
	// KeystoneAdminProject is the project whose admins are the operator,
	// by ID or by name in the Default domain. Default "admin".
	KeystoneAdminProject string `yaml:"keystone-admin-project" roles:"server,all-in-one"`
	// KeystoneCacheTTL is how long a token's validation is reused: a
	// token revoked in Keystone is refused at most this long after.
	// Never past the token's expiry. Default 60s.
	KeystoneCacheTTL time.Duration `yaml:"keystone-cache-ttl" roles:"server,all-in-one"`
	// PublicURL is the API as hosts reach it, written into Hyper-V plans;
	// default http://<the listen address>.
	PublicURL string `yaml:"public-url" roles:"server,all-in-one"`
	// HyperVHGS is the Host Guardian Service's URL for Hyper-V key
	// protectors; "" for local ones.
	HyperVHGS string `yaml:"hyperv-hgs-url" roles:"server,all-in-one"`
}

// XenConfig holds the Xen backend's settings.
type XenConfig struct {
	// ImageDir, ConfigDir, StubdomKernel and Manager are the xen.Layout;
	// empty ones take the original design's (see xen.Layout).
	ImageDir      string `yaml:"xen-image-dir" roles:"agent,all-in-one"`
	ConfigDir     string `yaml:"xen-config-dir" roles:"agent,all-in-one"`
	StubdomKernel string `yaml:"xen-stubdom-kernel" roles:"agent,all-in-one"`
	Manager       string `yaml:"xen-manager" roles:"agent,all-in-one"`
	// Group is the VTPM manager group vTPMs register to; default Group1
	// (Group0 is vtpmmgr's own).
	Group string `yaml:"xen-group" roles:"agent,all-in-one"`
	// GroupCapacity is how many vTPMs the group takes; default
	// xen.DefaultCapacity (64).
	GroupCapacity int `yaml:"xen-group-capacity" roles:"agent,all-in-one"`
	// UUIDListen, when set, serves the UUID service (GET / → a fresh
	// registered vTPM UUID) on HOST:PORT, as the original's did on 8081.
	UUIDListen string `yaml:"xen-uuid-listen" roles:"agent,all-in-one"`
}

// Layout is where the Xen backend keeps stub domains' files.
func (x XenConfig) Layout() xen.Layout {
	return xen.Layout{ImageDir: x.ImageDir, ConfigDir: x.ConfigDir, Kernel: x.StubdomKernel, Manager: x.Manager}
}

// LibvirtConfig holds the libvirt backend's operator settings, after the
// OpenStack charm's.
type LibvirtConfig struct {
	// Mode is "emulator" (default; libvirt runs swtpm, as under Nova) or
	// "external" (vtpmd runs swtpm, the guest connects to it).
	Mode string `yaml:"libvirt-mode" roles:"agent,all-in-one"`
	// EnableVTPM is enable-vtpm; off (the default) the host offers no vTPM.
	EnableVTPM bool `yaml:"enable-vtpm" roles:"agent,all-in-one"`
	// Socket is libvirtd's; default libvirt.DefaultSocket
	// (/var/run/libvirt/libvirt-sock).
	Socket string `yaml:"libvirt-socket" roles:"agent,all-in-one"`
	// MigrationURI is how the other hosts' libvirtd reach this host's to
	// live-migrate guests here (qemu+tcp://HOST/system, say); empty: the
	// host takes no live migrations.
	MigrationURI string `yaml:"libvirt-migration-uri" roles:"agent,all-in-one"`
	// SecretSecurity are the modes offered; default all three (user, host,
	// deployment).
	SecretSecurity []spec.SecretSecurity `yaml:"secret-security" roles:"agent,all-in-one"`
}

// DefaultBackupInterval is how often every vTPM is backed up unless the
// configuration says otherwise: a lost host costs at most this much of
// its vTPMs' changes (a stopped vTPM's: none). At about 5 ms of CPU and
// 10 KB per backup, 1,000 vTPMs cost well under 1 % of a core
// (docs/benchmarks.md).
const DefaultBackupInterval = time.Hour

// Defaults fills the unset fields. It is idempotent: a configuration it
// filled keeps every value when filled again.
func (c *Config) Defaults() {
	if c.DataDir == "" {
		c.DataDir = "/var/lib/vtpmd"
	}
	if c.HostAttestInterval == 0 {
		c.HostAttestInterval = 30 * time.Second
	}
	if c.HostEventLog == "" {
		c.HostEventLog = attestor.DefaultEventLog
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = agent.DefaultHeartbeatInterval
	}
	if c.BackupInterval == nil {
		c.BackupInterval = new(DefaultBackupInterval)
	}
	if c.BackupKeep == 0 {
		c.BackupKeep = vtpms.DefaultBackupKeep
	}
	if c.HeartbeatWindow == 0 {
		c.HeartbeatWindow = vtpms.DefaultHeartbeatWindow
	}
	if c.StaleAfter == 0 {
		c.StaleAfter = verifier.DefaultStaleAfter
	}
	if c.Listen == "" {
		c.Listen = "127.0.0.1:8780"
	}
	if c.APISocket == "" {
		c.APISocket = filepath.Join(c.DataDir, "api.sock")
	}
	if c.KeyManager == "" {
		c.KeyManager = "embedded"
	}
	if c.MasterKeyFile == "" {
		c.MasterKeyFile = filepath.Join(c.DataDir, "master.key")
	}
	if c.HostName == "" {
		c.HostName, _ = os.Hostname()
	}
	if c.Capacity == 0 {
		c.Capacity = 1000
	}
	if c.SwtpmBinary == "" {
		c.SwtpmBinary = "swtpm"
	}
	if len(c.PCRBanks) == 0 {
		c.PCRBanks = []string{"sha256"}
	}
	if c.CAOrganization == "" {
		c.CAOrganization = "vtpmd"
	}
	if c.Auth == "" {
		c.Auth = "certificates"
	}
	if c.KeystoneAdminProject == "" {
		c.KeystoneAdminProject = "admin"
	}
	if c.KeystoneCacheTTL == 0 {
		c.KeystoneCacheTTL = time.Minute
	}
	if c.PoolSize == nil {
		c.PoolSize = new(4)
	}
	if c.Backend == "" {
		c.Backend = "swtpm"
	}
	if c.Libvirt.Mode == "" {
		c.Libvirt.Mode = "emulator"
	}
	if c.Libvirt.Socket == "" {
		c.Libvirt.Socket = libvirt.DefaultSocket
	}
	if len(c.Libvirt.SecretSecurity) == 0 {
		c.Libvirt.SecretSecurity = []spec.SecretSecurity{spec.User, spec.HostMode, spec.Deployment}
	}
	if c.SocketDir == "" && c.libvirtExternal() {
		c.SocketDir = "/run/vtpmd"
	}
	if c.Xen.Group == "" {
		c.Xen.Group = "Group1"
	}
	if c.Xen.GroupCapacity == 0 {
		c.Xen.GroupCapacity = xen.DefaultCapacity
	}
}

func (c *Config) libvirtExternal() bool {
	return c.Backend == "libvirt" && c.Libvirt.Mode == "external"
}

// Validate reports every problem with the configuration at once.
func (c *Config) Validate() error {
	var errs []error
	if !filepath.IsAbs(c.DataDir) {
		errs = append(errs, fmt.Errorf("data dir %q must be an absolute path", c.DataDir))
	}
	if host, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("listen address %q: %w", c.Listen, err))
	} else if !loopback(host) && (c.TLSCert == "" || (c.ClientCA == "" && c.Auth != "keystone")) && !c.InsecureListen {
		errs = append(errs, fmt.Errorf("listen address %q is not loopback: serving the network needs TLS (--tls-cert, --tls-key) and client certificates (--client-ca) or --auth keystone, "+
			"or --insecure-listen to serve it anyway with agents' and callers' tokens in the clear", c.Listen))
	}
	switch c.Auth {
	case "certificates":
	case "keystone":
		if u, err := url.Parse(c.KeystoneURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("--auth keystone needs --keystone-url, Keystone's http(s):// identity URL (got %q)", c.KeystoneURL))
		}
		if c.KeystoneCredentialsFile == "" {
			errs = append(errs, errors.New("--auth keystone needs --keystone-credentials-file, vtpmd's own service user"))
		}
	default:
		errs = append(errs, fmt.Errorf("auth %q must be certificates or keystone", c.Auth))
	}
	if c.KeystoneCacheTTL < 0 || c.KeystoneCacheTTL > time.Hour {
		errs = append(errs, fmt.Errorf("keystone-cache-ttl %s must be between 0 and 1h", c.KeystoneCacheTTL))
	}
	if !filepath.IsAbs(c.APISocket) {
		errs = append(errs, fmt.Errorf("API socket %q must be an absolute path", c.APISocket))
	}
	switch c.KeyManager {
	case "embedded":
	case "barbican":
		if u, err := url.Parse(c.KeystoneURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("--key-manager barbican needs --keystone-url, Keystone's http(s):// identity URL (got %q)", c.KeystoneURL))
		}
		if c.KeystoneCredentialsFile == "" {
			errs = append(errs, errors.New("--key-manager barbican needs --keystone-credentials-file, vtpmd's own service user"))
		}
		if u, err := url.Parse(c.BarbicanURL); c.BarbicanURL != "" && (err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "") {
			errs = append(errs, fmt.Errorf("barbican url %q: want http(s)://host[:port]", c.BarbicanURL))
		}
	default:
		errs = append(errs, fmt.Errorf("key manager %q must be embedded or barbican", c.KeyManager))
	}
	if !filepath.IsAbs(c.MasterKeyFile) {
		errs = append(errs, fmt.Errorf("master key file %q must be an absolute path", c.MasterKeyFile))
	}
	if c.HostName == "" {
		errs = append(errs, errors.New("host name is empty and the OS gave none"))
	}
	if c.Capacity < 1 || c.Capacity > 100000 {
		errs = append(errs, fmt.Errorf("capacity %d must be between 1 and 100000", c.Capacity))
	}
	switch c.DefaultTPMVersion {
	case "", spec.V12, spec.V20:
	default:
		errs = append(errs, fmt.Errorf("default TPM version %q must be 1.2, 2.0 or empty", c.DefaultTPMVersion))
	}
	for _, b := range c.PCRBanks {
		if b != "sha1" && b != "sha256" && b != "sha384" && b != "sha512" {
			errs = append(errs, fmt.Errorf("PCR bank %q must be sha1, sha256, sha384 or sha512", b))
		}
	}
	if c.SwtpmUser != "" {
		if _, err := user.Lookup(c.SwtpmUser); err != nil {
			errs = append(errs, fmt.Errorf("swtpm user %q does not exist", c.SwtpmUser))
		}
	}
	if c.SwtpmGroup != "" {
		if _, err := user.LookupGroup(c.SwtpmGroup); err != nil {
			errs = append(errs, fmt.Errorf("swtpm group %q does not exist", c.SwtpmGroup))
		}
	}
	if c.SocketDir != "" && !filepath.IsAbs(c.SocketDir) {
		errs = append(errs, fmt.Errorf("socket dir %q must be an absolute path", c.SocketDir))
	}
	if c.SocketGroup != "" {
		if _, err := user.LookupGroup(c.SocketGroup); err != nil {
			errs = append(errs, fmt.Errorf("socket group %q does not exist", c.SocketGroup))
		}
		if c.SocketDir == "" {
			errs = append(errs, errors.New("a socket group needs a socket dir: vTPM state directories are private"))
		}
	}
	if c.WebhookURL != "" {
		if u, err := url.Parse(c.WebhookURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("webhook URL %q must be an http or https URL", c.WebhookURL))
		} else if strings.Contains(c.WebhookURL, Redacted) {
			errs = append(errs, fmt.Errorf("webhook URL %q was redacted by vtpmd config print: give the real one", c.WebhookURL))
		}
	}
	if c.PoolSize != nil && (*c.PoolSize < 0 || *c.PoolSize > 1000) {
		errs = append(errs, fmt.Errorf("pool size %d must be between 0 and 1000", *c.PoolSize))
	}
	if c.HostAttestInterval < 0 {
		errs = append(errs, fmt.Errorf("host attest interval %s must be positive", c.HostAttestInterval))
	}
	if c.BackupInterval != nil && *c.BackupInterval < 0 {
		errs = append(errs, fmt.Errorf("backup-interval %s must not be negative", *c.BackupInterval))
	}
	if c.BackupKeep < 0 {
		errs = append(errs, fmt.Errorf("backup-keep %d must not be negative", c.BackupKeep))
	}
	if c.HeartbeatInterval <= 0 {
		errs = append(errs, fmt.Errorf("heartbeat-interval %s must be positive", c.HeartbeatInterval))
	}
	if c.HeartbeatWindow <= 0 {
		errs = append(errs, fmt.Errorf("heartbeat-window %s must be positive", c.HeartbeatWindow))
	}
	if c.StaleAfter < 0 {
		errs = append(errs, fmt.Errorf("stale-after %s must be positive", c.StaleAfter))
	}
	if c.Xen.GroupCapacity < 0 {
		errs = append(errs, fmt.Errorf("xen group capacity %d must be positive", c.Xen.GroupCapacity))
	}
	if c.Backend != "swtpm" && c.Backend != "libvirt" && c.Backend != "xen" {
		errs = append(errs, fmt.Errorf("backend %q must be swtpm, libvirt or xen", c.Backend))
	}
	if c.Store != "" {
		if err := checkStoreDSN(c.Store); err != nil {
			errs = append(errs, err)
		}
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		errs = append(errs, errors.New("TLS needs both a certificate and a key file"))
	}
	if c.ClientCA != "" && c.TLSCert == "" {
		errs = append(errs, errors.New("client certificates (--client-ca) need TLS (--tls-cert, --tls-key)"))
	}
	if c.Xen.UUIDListen != "" {
		if _, _, err := net.SplitHostPort(c.Xen.UUIDListen); err != nil {
			errs = append(errs, fmt.Errorf("xen UUID service address %q: %w", c.Xen.UUIDListen, err))
		}
	}
	if c.Server != "" {
		if u, err := url.Parse(c.Server); err != nil || u.Scheme != "https" || u.Host == "" || u.User != nil {
			errs = append(errs, fmt.Errorf("server %q must be the control plane's https:// URL", c.Server))
		}
	}
	if c.Libvirt.Mode != "emulator" && c.Libvirt.Mode != "external" {
		errs = append(errs, fmt.Errorf("libvirt mode %q must be emulator or external", c.Libvirt.Mode))
	}
	for _, m := range c.Libvirt.SecretSecurity {
		if m != spec.User && m != spec.HostMode && m != spec.Deployment {
			errs = append(errs, fmt.Errorf("secret security %q must be user, host or deployment", m))
		}
	}
	return errors.Join(errs...)
}

// ValidateRole is Validate and the checks across settings that only role
// r has both of: all-in-one's heartbeat-window must be longer than its
// agent's heartbeat-interval. (A server's window is checked against its
// agents' intervals by nobody: docs/deployment.md says to keep it several
// times theirs.)
func (c *Config) ValidateRole(r Role) error {
	err := c.Validate()
	if r == RoleAllInOne {
		err = errors.Join(err, c.checkHeartbeats())
	}
	return err
}

// checkHeartbeats refuses a heartbeat window no longer than the interval:
// the host would read down between two heartbeats.
func (c *Config) checkHeartbeats() error {
	if c.HeartbeatWindow <= c.HeartbeatInterval {
		return fmt.Errorf("heartbeat-window %s must be longer than heartbeat-interval %s", c.HeartbeatWindow, c.HeartbeatInterval)
	}
	return nil
}

// loopback reports whether a listen host stays on this machine: localhost
// or a loopback IP. "" and 0.0.0.0 are every interface.
func loopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkStoreDSN refuses a PostgreSQL connection string that carries a
// password (it would show in the process's arguments) or is not one.
func checkStoreDSN(dsn string) error {
	const noPassword = "store: the connection string carries a password; put it in a passfile (PGPASSFILE or ~/.pgpass)"
	if u, err := url.Parse(dsn); err == nil && u.User != nil {
		if _, ok := u.User.Password(); ok {
			return errors.New(noPassword)
		}
	}
	if strings.Contains(dsn, "password=") {
		return errors.New(noPassword)
	}
	if _, err := pgconn.ParseConfig(dsn); err != nil {
		return fmt.Errorf("store: not a PostgreSQL connection string: %w", err)
	}
	return nil
}
