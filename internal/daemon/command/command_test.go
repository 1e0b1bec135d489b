package command

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/daemon"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// run runs vtpmd with args and returns its exit status, stdout and stderr.
func run(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := Main(context.Background(), args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

// printed runs vtpmd config print with args and reads its output back,
// as the configuration of the role args name (--role; all-in-one unless).
func printed(t *testing.T, args ...string) (daemon.Config, string) {
	t.Helper()
	code, out, errOut := run(t, append([]string{"config", "print"}, args...)...)
	if code != ExitOK {
		t.Fatalf("config print %v: exit %d\n%s", args, code, errOut)
	}
	role := daemon.RoleAllInOne
	if i := slices.Index(args, "--role"); i >= 0 {
		role = daemon.Role(args[i+1])
	}
	c, err := daemon.ParseConfig([]byte(out), role)
	if err != nil {
		t.Fatalf("config print's output does not read back: %v\n%s", err, out)
	}
	return c, out
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "vtpmd.yaml")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// Every flag vtpmd all-in-one had before it read files keeps its name and
// sets its field, and --help shows daemon.Config's defaults.
func TestEveryFlag(t *testing.T) {
	args := []string{
		"--data-dir", "/srv/vtpmd", "--master-key-file", "/etc/vtpmd/master.key", "--listen", "0.0.0.0:9000", "--insecure-listen", "--api-socket", "/run/vtpmd-api.sock",
		"--host-name", "hv1", "--capacity", "12", "--swtpm-user", "root", "--swtpm-group", "root",
		"--socket-dir", "/run/vt", "--socket-group", "root", "--default-tpm-version", "2.0", "--log-level", "debug",
		"--webhook-url", "https://hooks.example", "--host-tpm", "/dev/tpmrm0", "--host-event-log", "/var/log/bios",
		"--host-attest-interval", "45s", "--host-ima-log", "/var/log/ima", "--stale-after", "5m", "--host-ek-ca", "/etc/ek.pem",
		"--heartbeat-interval", "5s", "--heartbeat-window", "2m", "--pool-size", "0", "--backend", "xen", "--libvirt-mode", "external", "--enable-vtpm", "--libvirt-socket", "/run/lv.sock",
		"--secret-security", "user, host", "--store", "postgres://vtpmd@db/vtpmd", "--tls-cert", "/etc/c.pem",
		"--tls-key", "/etc/k.pem", "--client-ca", "/etc/ca.pem", "--public-url", "https://vtpmd.example:8780",
		"--hyperv-hgs-url", "https://hgs.example", "--xen-image-dir", "/xi", "--xen-config-dir", "/xc",
		"--xen-stubdom-kernel", "/boot/vtpm.gz", "--xen-manager", "mgr", "--xen-group", "Group2",
		"--xen-group-capacity", "8", "--xen-uuid-listen", "127.0.0.1:8081",
		// settings that were Config's only, flags now too
		"--swtpm-binary", "/usr/bin/swtpm", "--pcr-banks", "sha256,sha384", "--ca-organization", "Example",
		// Keystone authentication
		"--auth", "keystone", "--keystone-url", "http://keystone:5000/v3", "--keystone-credentials-file", "/etc/vtpmd/keystone.yaml",
		"--keystone-admin-project", "cloud-admin", "--keystone-cache-ttl", "20s",
		// Barbican
		"--key-manager", "barbican", "--barbican-url", "https://barbican:9311",
		// state backups
		"--backup-interval", "1h", "--backup-keep", "5",
	}
	want := daemon.Config{
		DataDir: "/srv/vtpmd", MasterKeyFile: "/etc/vtpmd/master.key", Listen: "0.0.0.0:9000", InsecureListen: true, APISocket: "/run/vtpmd-api.sock",
		HostName: "hv1", Capacity: 12, SwtpmUser: "root", SwtpmGroup: "root",
		SocketDir: "/run/vt", SocketGroup: "root", DefaultTPMVersion: spec.V20, LogLevel: slog.LevelDebug,
		WebhookURL: "https://hooks.example", HostTPM: "/dev/tpmrm0", HostEventLog: "/var/log/bios",
		HostAttestInterval: 45 * time.Second, HostIMALog: "/var/log/ima", StaleAfter: 5 * time.Minute, HostEKCA: "/etc/ek.pem",
		HeartbeatInterval: 5 * time.Second, HeartbeatWindow: 2 * time.Minute, PoolSize: new(0), Backend: "xen",
		Libvirt: daemon.LibvirtConfig{Mode: "external", EnableVTPM: true, Socket: "/run/lv.sock",
			SecretSecurity: []spec.SecretSecurity{spec.User, spec.HostMode}},
		Store: "postgres://vtpmd@db/vtpmd", TLSCert: "/etc/c.pem", TLSKey: "/etc/k.pem", ClientCA: "/etc/ca.pem",
		PublicURL: "https://vtpmd.example:8780", HyperVHGS: "https://hgs.example",
		Xen: daemon.XenConfig{ImageDir: "/xi", ConfigDir: "/xc", StubdomKernel: "/boot/vtpm.gz", Manager: "mgr",
			Group: "Group2", GroupCapacity: 8, UUIDListen: "127.0.0.1:8081"},
		SwtpmBinary: "/usr/bin/swtpm", PCRBanks: []string{"sha256", "sha384"}, CAOrganization: "Example",
		Auth: "keystone", KeystoneURL: "http://keystone:5000/v3", KeystoneCredentialsFile: "/etc/vtpmd/keystone.yaml",
		KeystoneAdminProject: "cloud-admin", KeystoneCacheTTL: 20 * time.Second,
		KeyManager: "barbican", BarbicanURL: "https://barbican:9311",
		BackupInterval: new(time.Hour), BackupKeep: 5,
	}
	got, out := printed(t, args...)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("flags gave\n%s\nwant\n%s", out, daemon.FormatConfig(want, daemon.RoleAllInOne))
	}
	// vtpmd agent's way to its server, which all-in-one has not.
	agentArgs := []string{"--role", "agent", "--server", "https://control.example:8780", "--server-ca", "/etc/vtpmd/server-ca.pem", "--join-token-file", "/etc/vtpmd/join-token"}
	if got, _ := printed(t, agentArgs...); got.Server != "https://control.example:8780" || got.ServerCA != "/etc/vtpmd/server-ca.pem" || got.JoinTokenFile != "/etc/vtpmd/join-token" {
		t.Errorf("vtpmd agent's flags gave %+v", got)
	}
	if n := len(args)/2 + len(agentArgs)/2 - 1; n < len(want.Settings())-2 { // two boolean flags take no value
		t.Errorf("the test gives %d flags for %d settings", n, len(want.Settings()))
	}

	var defaults daemon.Config
	defaults.Defaults()
	flags := newAllInOneCommand().Flags()
	for flag, def := range map[string]string{"pool-size": "4", "capacity": "1000", "stale-after": "3m0s", "heartbeat-window": "1m0s", "heartbeat-interval": "10s",
		"host-attest-interval": "30s", "listen": "127.0.0.1:8780", "secret-security": "user,host,deployment",
		"log-level": "info", "xen-group-capacity": "64"} {
		if got := flags.Lookup(flag).DefValue; got != def {
			t.Errorf("--%s shows the default %q, want %q", flag, got, def)
		}
	}
}

// Each role's command has a flag for each of its settings and none for
// another role's, which it refuses, saying whose it is (exit 2).
func TestRoleFlags(t *testing.T) {
	var c daemon.Config
	for _, role := range daemon.Roles {
		flags := roleFlags(role)
		for _, s := range c.Settings() {
			if has := flags.Lookup(s.Key) != nil; has != s.In(role) {
				t.Errorf("vtpmd %s has --%s: %v, want %v", role, s.Key, has, s.In(role))
			}
		}
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"server", "--listen", "127.0.0.1:0", "--heartbeat-interval", "1s"},
			"unknown flag: --heartbeat-interval: --heartbeat-interval is a setting of vtpmd agent and vtpmd all-in-one, not of vtpmd server"},
		{[]string{"server", "--capacity=5"}, "--capacity is a setting of vtpmd agent and vtpmd all-in-one, not of vtpmd server"},
		{[]string{"agent", "--server", "https://control:8780", "--heartbeat-window", "1m"},
			"--heartbeat-window is a setting of vtpmd server and vtpmd all-in-one, not of vtpmd agent"},
		{[]string{"agent", "--store", "postgres://db/vtpmd"}, "--store is a setting of vtpmd server and vtpmd all-in-one, not of vtpmd agent"},
		{[]string{"all-in-one", "--join-token-file", "t"}, "--join-token-file is a setting of vtpmd agent, not of vtpmd all-in-one"},
		{[]string{"keys", "rotate-master", "--new-key-file", "k", "--pool-size", "0"}, "--pool-size is a setting of vtpmd agent and vtpmd all-in-one, not of vtpmd server"},
		{[]string{"server", "--bogus"}, "unknown flag: --bogus\n"},
	} {
		code, out, errOut := run(t, c.args...)
		if code != ExitUsage || out != "" || !strings.Contains(errOut, c.want) {
			t.Errorf("%v: exit %d, stdout %q, stderr\n%s\nwant %q", c.args, code, out, errOut, c.want)
		}
	}
}

// config print --role prints that role's settings only, refuses another
// role's as a flag or a key of the file, and reads back as the role's file.
func TestConfigPrintRoles(t *testing.T) {
	server, out := printed(t, "--role", "server", "--listen", "127.0.0.1:9000", "--heartbeat-window", "5s")
	if server.Listen != "127.0.0.1:9000" || server.HeartbeatWindow != 5*time.Second || !strings.HasPrefix(out, "# vtpmd server's configuration") {
		t.Errorf("vtpmd server's configuration:\n%s", out)
	}
	for _, key := range []string{"\nheartbeat-interval:", "\ncapacity:", "\nbackend:", "\nserver:", "\nhost-name:"} {
		if strings.Contains(out, key) {
			t.Errorf("vtpmd server's configuration has %s:\n%s", key[1:], out)
		}
	}
	agent, out := printed(t, "--role", "agent", "--server", "https://control:8780", "--heartbeat-interval", "2s")
	if agent.Server != "https://control:8780" || agent.HeartbeatInterval != 2*time.Second {
		t.Errorf("vtpmd agent's configuration:\n%s", out)
	}
	for _, key := range []string{"\nheartbeat-window:", "\nlisten:", "\nstore:", "\nwebhook-url:"} {
		if strings.Contains(out, key) {
			t.Errorf("vtpmd agent's configuration has %s:\n%s", key[1:], out)
		}
	}
	if code, _, errOut := run(t, "server", "--config", writeFile(t, out)); code != ExitUsage ||
		!strings.Contains(errOut, "server: a setting of vtpmd agent, not of vtpmd server") ||
		!strings.Contains(errOut, "heartbeat-interval: a setting of vtpmd agent and vtpmd all-in-one, not of vtpmd server") {
		t.Errorf("vtpmd server given an agent's file: exit %d\n%s", code, errOut)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--role", "server", "--capacity", "5", "--backend", "xen"},
			"--capacity is a setting of vtpmd agent and vtpmd all-in-one, not of vtpmd server; --backend is"},
		{[]string{"--role", "agent", "--config", writeFile(t, "capacity: 5\nlisten: 127.0.0.1:1\n")},
			"line 2: listen: a setting of vtpmd server and vtpmd all-in-one, not of vtpmd agent"},
		{[]string{"--role", "hypervisor"}, `role "hypervisor" must be server, agent or all-in-one`},
	} {
		code, out, errOut := run(t, append([]string{"config", "print"}, c.args...)...)
		if code != ExitUsage || out != "" || !strings.Contains(errOut, c.want) {
			t.Errorf("config print %v: exit %d, stdout %q, stderr\n%s\nwant %q", c.args, code, out, errOut, c.want)
		}
	}
}

// Every flag the README's Configuration table names is one of a role's,
// and the table's roles column says whose.
func TestREADMEFlags(t *testing.T) {
	readme, err := os.ReadFile("../../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(readme), "\n## Configuration\n")
	section, _, _ = strings.Cut(section, "\n## ")
	n := 0
	for _, line := range strings.Split(section, "\n") {
		if !strings.HasPrefix(line, "| `--") {
			continue
		}
		cells := strings.Split(line, " | ")
		if len(cells) < 3 {
			t.Errorf("the README's row %q has no roles column", line)
			continue
		}
		want := strings.Split(cells[1], ", ")
		if cells[1] == "all" {
			want = []string{"server", "agent", "all-in-one"}
		}
		for _, m := range regexp.MustCompile("`--([a-z0-9-]+)").FindAllStringSubmatch(cells[0], -1) {
			n++
			var has []string
			for _, r := range daemon.Roles {
				if roleFlags(r).Lookup(m[1]) != nil {
					has = append(has, string(r))
				}
			}
			if !slices.Equal(has, want) {
				t.Errorf("the README gives --%s the roles %v; they are %v", m[1], want, has)
			}
		}
	}
	if n < 38 {
		t.Errorf("found only %d flags in the README's Configuration table", n)
	}
}

// roleFlags are role r's command's flags.
func roleFlags(r daemon.Role) *pflag.FlagSet {
	return map[daemon.Role]func() *cobra.Command{daemon.RoleServer: newServerCommand, daemon.RoleAgent: newAgentCommand,
		daemon.RoleAllInOne: newAllInOneCommand}[r]().Flags()
}

// The README's example configuration file is one vtpmd reads.
func TestREADMEExample(t *testing.T) {
	readme, err := os.ReadFile("../../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, example, ok := strings.Cut(string(readme), "```yaml\n# /etc/vtpmd/vtpmd.yaml")
	example, _, _ = strings.Cut(example, "```")
	if !ok {
		t.Fatal("the README has no example configuration file")
	}
	if code, _, errOut := run(t, "config", "print", "--config", writeFile(t, example)); code != ExitOK {
		t.Errorf("the README's example: exit %d\n%s", code, errOut)
	}
}

// The file overrides the defaults and the flags given override the file;
// a key the file leaves out keeps its default, one derived from another
// setting follows it, and an explicit zero is not taken for unset.
func TestConfigFileAndFlags(t *testing.T) {
	file := writeFile(t, `
data-dir: /srv/vtpmd
capacity: 5
listen: 127.0.0.1:9999
host-name: from-file
pool-size: 0
stale-after: 90s
`)
	got, _ := printed(t, "--config", file, "--capacity", "7", "--host-name", "from-flag", "--log-level", "warn")
	want := daemon.Config{DataDir: "/srv/vtpmd", Capacity: 7, Listen: "127.0.0.1:9999", HostName: "from-flag",
		PoolSize: new(0), StaleAfter: 90 * time.Second, LogLevel: slog.LevelWarn}
	want.Defaults()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("file plus flags gave %+v\nwant %+v", got, want)
	}
	if got.APISocket != "/srv/vtpmd/api.sock" {
		t.Errorf("the operator's socket does not follow the file's data dir: %s", got.APISocket)
	}
	// A relative --data-dir is the working directory's, as before.
	rel, _ := printed(t, "--config", file, "--data-dir", "state")
	if wd, _ := os.Getwd(); rel.DataDir != filepath.Join(wd, "state") {
		t.Errorf("--data-dir state: %s", rel.DataDir)
	}
}

// Printing, feeding the output back as the file and printing again gives
// the same configuration.
func TestConfigPrintRoundTrip(t *testing.T) {
	first, out := printed(t, "--host-name", "hv1", "--backend", "libvirt", "--libvirt-mode", "external", "--enable-vtpm",
		"--pool-size", "0", "--stale-after", "90s", "--default-tpm-version", "1.2", "--pcr-banks", "sha1,sha256",
		"--log-level", "error", "--secret-security", "deployment")
	second, again := printed(t, "--config", writeFile(t, out))
	if !reflect.DeepEqual(first, second) || out != again {
		t.Errorf("printed\n%s\nthen, from that file\n%s", out, again)
	}
	if *first.PoolSize != 0 || first.SocketDir != "/run/vtpmd" {
		t.Errorf("pool size %d, socket dir %q", *first.PoolSize, first.SocketDir)
	}
}

// config print hides what may be a secret, and the redacted output cannot
// be fed back by mistake.
func TestConfigPrintRedacts(t *testing.T) {
	_, out := printed(t, "--webhook-url", "https://bot:pa55@hooks.example/services/T0/B0/t0ken?sig=s1g",
		"--store", "postgres://vtpmd@db.example/vtpmd?sslmode=verify-full")
	for _, secret := range []string{"pa55", "t0ken", "s1g"} {
		if strings.Contains(out, secret) {
			t.Errorf("config print shows %q:\n%s", secret, out)
		}
	}
	for _, kept := range []string{"webhook-url: https://bot:REDACTED@hooks.example/REDACTED\n",
		"store: postgres://vtpmd@db.example/vtpmd?sslmode=verify-full\n"} {
		if !strings.Contains(out, kept) {
			t.Errorf("config print does not show %q:\n%s", kept, out)
		}
	}
	code, _, errOut := run(t, "config", "print", "--config", writeFile(t, out))
	if code != ExitUsage || !strings.Contains(errOut, "redacted") {
		t.Errorf("feeding back a redacted configuration: exit %d\n%s", code, errOut)
	}
}

// Bad input is a usage error (exit 2) that says what is wrong, all of it
// at once, and prints no configuration.
func TestBadInput(t *testing.T) {
	for _, c := range []struct {
		args []string
		want []string
	}{
		{[]string{"config", "print", "--bogus"}, []string{"unknown flag: --bogus"}},
		{[]string{"all-in-one", "--bogus"}, []string{"unknown flag: --bogus"}},
		{[]string{"config", "print", "--capacity", "many"}, []string{`"--capacity"`}},
		{[]string{"config", "print", "--log-level", "loud"}, []string{`"--log-level"`}},
		{[]string{"config", "print", "--config", "/nonexistent/vtpmd.yaml"}, []string{"/nonexistent/vtpmd.yaml"}},
		{[]string{"config", "print", "--config", writeFile(t, "capacity: 5\n\ncapacty: 7\nlisten: [1]\n")},
			[]string{"line 3: capacty: unknown key", "line 4: listen: want a string"}},
		{[]string{"config", "print", "--config", writeFile(t, "capacity: [\n")}, []string{"vtpmd.yaml: yaml: line 1"}},
		{[]string{"config", "print", "--capacity", "-1", "--backend", "hyperv", "--listen", "0.0.0.0:8780", "--pool-size", "-1"},
			[]string{"invalid configuration", `backend "hyperv"`, "not loopback", "pool size -1", "capacity -1"}},
		{[]string{"all-in-one", "--data-dir", "relative-to-nothing-but-fine", "--stale-after", "-1s"}, []string{"stale-after -1s"}},
		{[]string{"all-in-one", "now"}, []string{"takes no arguments"}},
		{[]string{"bogus"}, []string{`unknown command "bogus"`}},
		{[]string{"xen-uuid-server"}, []string{"--listen HOST:PORT is required"}},
		{[]string{"xen-uuid-server", "--listen", "127.0.0.1:0", "--data-dir", t.TempDir(), "--group", "Group0"}, []string{"Group0 is special"}},
		{[]string{"agent", "configure-host", "--swtpm-user", "root"}, []string{"--swtpm-group are required"}},
		{[]string{"agent"}, []string{"--server https://"}},
		{[]string{"agent", "--server", "http://control:8780"}, []string{`server "http://control:8780" must be the control plane's https:// URL`}},
		{[]string{}, []string{"server", "agent", "all-in-one", "config"}},
	} {
		code, out, errOut := run(t, c.args...)
		if code != ExitUsage || out != "" {
			t.Errorf("%v: exit %d, output %q", c.args, code, out)
		}
		for _, w := range c.want {
			if !strings.Contains(errOut, w) {
				t.Errorf("%v: stderr does not say %q:\n%s", c.args, w, errOut)
			}
		}
	}
}

// configure-host sets libvirt's swtpm user and group, keeping the other
// lines, and says so; run again it changes nothing.
func TestConfigureHost(t *testing.T) {
	conf := writeFile(t, "# libvirt's\nuser = \"root\"\n#swtpm_user = \"tss\"\n")
	code, out, errOut := run(t, "agent", "configure-host", "--swtpm-user", "tss", "--swtpm-group", "tss", "--qemu-conf", conf)
	if code != ExitOK || !strings.Contains(out, "restart libvirtd") {
		t.Fatalf("exit %d\n%s%s", code, out, errOut)
	}
	b, _ := os.ReadFile(conf)
	if s := string(b); !strings.Contains(s, "user = \"root\"\n") || !strings.Contains(s, "\nswtpm_user = \"tss\"") || !strings.Contains(s, "\nswtpm_group = \"tss\"") {
		t.Errorf("qemu.conf now:\n%s", s)
	}
	if code, out, _ := run(t, "agent", "configure-host", "--swtpm-user", "tss", "--swtpm-group", "tss", "--qemu-conf", conf); code != ExitOK || !strings.Contains(out, "nothing changed") {
		t.Errorf("again: exit %d, %s", code, out)
	}
}

// vtpmd all-in-one runs on the configuration from its file and flags
// until its context ends, then stops cleanly. (The data dir comes by flag:
// were the file ignored, the test would not touch /var/lib/vtpmd.)
func TestAllInOne(t *testing.T) {
	swtpmtest.Require(t)
	dir := t.TempDir()
	file := writeFile(t, "listen: 127.0.0.1:0\npool-size: 0\ncapacity: 3\nhost-name: from-file\n")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stderr bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- Main(ctx, []string{"all-in-one", "--config", file, "--data-dir", dir, "--host-name", "from-flag", "--log-level", "error"}, &bytes.Buffer{}, &stderr)
	}()
	c := client.New("unix://"+filepath.Join(dir, "api.sock"), "")
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
		hosts, err := c.Hosts(ctx)
		if err == nil {
			if len(hosts.Items) != 1 || hosts.Items[0].Name != "from-flag" || hosts.Items[0].Capacity != 3 {
				t.Errorf("hosts: %+v", hosts)
			}
			break
		}
		select {
		case code := <-done:
			t.Fatalf("vtpmd all-in-one exited %d\n%s", code, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("vtpmd all-in-one did not answer: %v", err)
		}
	}
	cancel()
	if code := <-done; code != ExitOK {
		t.Errorf("exit %d after its context ended\n%s", code, stderr.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "api.sock")); !os.IsNotExist(err) {
		t.Errorf("the operator's socket outlived vtpmd: %v", err)
	}
	if strings.Contains(stderr.String(), `"level":"INFO"`) {
		t.Errorf("--log-level error logged at info:\n%s", stderr.String())
	}
}
