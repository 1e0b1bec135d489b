package daemon

import (
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/spec"
)

// Every field of Config is one setting with a key of its own, and Settings
// points into the Config it was called on.
func TestSettings(t *testing.T) {
	var c Config
	settings := c.Settings()
	seen := map[string]bool{}
	for _, s := range settings {
		if s.Key == "" || seen[s.Key] {
			t.Errorf("setting key %q is empty or repeated", s.Key)
		}
		seen[s.Key] = true
	}
	fields := 0
	for _, t := range []reflect.Type{reflect.TypeFor[Config](), reflect.TypeFor[LibvirtConfig](), reflect.TypeFor[XenConfig]()} {
		fields += t.NumField()
	}
	if want := fields - 2; len(settings) != want { // Libvirt and Xen are inlined
		t.Errorf("%d settings for %d fields", len(settings), want)
	}
	for _, s := range settings {
		if s.Key == "xen-group-capacity" {
			*s.Field.(*int) = 9
		}
	}
	if c.Xen.GroupCapacity != 9 {
		t.Error("a setting's field does not point into its Config")
	}
	for _, s := range settings {
		if len(s.Roles) == 0 {
			t.Errorf("setting %s belongs to no role", s.Key)
		}
		if !s.In(RoleAllInOne) && !(s.In(RoleAgent) && len(s.Roles) == 1) {
			t.Errorf("setting %s (%v) is not all-in-one's: only the agent's way to its server may be missing there", s.Key, s.Roles)
		}
	}
	for key, want := range map[string][]Role{"heartbeat-interval": {RoleAgent, RoleAllInOne}, "heartbeat-window": {RoleServer, RoleAllInOne},
		"server": {RoleAgent}, "data-dir": Roles, "listen": {RoleServer, RoleAllInOne}, "capacity": {RoleAgent, RoleAllInOne}} {
		if got := RolesOf(key); !reflect.DeepEqual(got, want) {
			t.Errorf("%s belongs to %v, want %v", key, got, want)
		}
	}
}

// A role's file refuses another role's keys, saying whose they are, and
// FormatConfig writes a role's keys only.
func TestConfigRoles(t *testing.T) {
	_, err := ParseConfig([]byte("listen: 127.0.0.1:1\nheartbeat-interval: 1s\nserver: https://control\n"), RoleServer)
	for _, want := range []string{"line 2: heartbeat-interval: a setting of vtpmd agent and vtpmd all-in-one, not of vtpmd server",
		"line 3: server: a setting of vtpmd agent, not of vtpmd server"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("a server's file with agents' keys: %v, want %q", err, want)
		}
	}
	var ke *KeyError
	if !errors.As(err, &ke) || ke.Key != "heartbeat-interval" {
		t.Errorf("%v: not a KeyError for heartbeat-interval", err)
	}
	if _, err := ParseConfig([]byte("listen: 127.0.0.1:1\n"), RoleAgent); err == nil || !strings.Contains(err.Error(), "not of vtpmd agent") {
		t.Errorf("an agent's file with the API's address: %v", err)
	}
	var c Config
	c.Defaults()
	for _, r := range Roles {
		out := string(FormatConfig(c, r))
		for _, s := range c.Settings() {
			if has := strings.Contains(out, "\n"+s.Key+":") || strings.HasPrefix(out, s.Key+":"); has != s.In(r) {
				t.Errorf("%s's configuration has %s: %v, want %v\n%s", r, s.Key, has, s.In(r), out)
			}
		}
		if _, err := ParseConfig([]byte(out), r); err != nil {
			t.Errorf("%s's configuration does not read back: %v", r, err)
		}
	}
}

// A configuration file sets what it names and leaves the rest to
// Defaults; every problem is reported at once, with its key and line.
func TestParseConfig(t *testing.T) {
	c, err := ParseConfig([]byte(`# a comment
data-dir: /srv/vtpmd
capacity: 12
pool-size: 0
stale-after: 90s
default-tpm-version: 2.0
log-level: debug
backend: libvirt
libvirt-mode: external
secret-security: [user, deployment]
xen-stubdom-kernel: /boot/vtpm.gz
`), RoleAllInOne)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{DataDir: "/srv/vtpmd", Capacity: 12, PoolSize: new(0), StaleAfter: 90 * time.Second,
		DefaultTPMVersion: spec.V20, LogLevel: slog.LevelDebug, Backend: "libvirt",
		Libvirt: LibvirtConfig{Mode: "external", SecretSecurity: []spec.SecretSecurity{spec.User, spec.Deployment}},
		Xen:     XenConfig{StubdomKernel: "/boot/vtpm.gz"}}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("parsed %+v\nwant   %+v", c, want)
	}
	c.Defaults()
	if *c.PoolSize != 0 || c.APISocket != "/srv/vtpmd/api.sock" || c.SocketDir != "/run/vtpmd" {
		t.Errorf("an explicit pool size of 0, or a derived default, was lost: pool %d, socket %s, socket dir %s", *c.PoolSize, c.APISocket, c.SocketDir)
	}
	if c, err := ParseConfig([]byte("# nothing set\n"), RoleAllInOne); err != nil || !reflect.DeepEqual(c, Config{}) {
		t.Errorf("a file of comments: %+v, %v", c, err)
	}

	_, err = ParseConfig([]byte("capacity: 5\ncapacty: 7\nstale-after: 30\ncapacity: 6\npcr-banks: sha256\n"), RoleAllInOne)
	var problems []string
	for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
		var ke *KeyError
		if !errors.As(e, &ke) {
			t.Fatalf("%v is not a KeyError", e)
		}
		problems = append(problems, fmt.Sprintf("%s@%d", ke.Key, ke.Line))
	}
	if got := strings.Join(problems, " "); got != "capacty@2 stale-after@3 capacity@4 pcr-banks@5" {
		t.Errorf("problems: %s\n%v", got, err)
	}
	if !strings.Contains(err.Error(), `line 2: capacty: unknown key`) || !strings.Contains(err.Error(), `want a duration such as "30s", not "30"`) {
		t.Errorf("the messages do not say what is wrong: %v", err)
	}
	for _, bad := range []string{"- data-dir\n", "data-dir: [\n"} {
		if _, err := ParseConfig([]byte(bad), RoleAllInOne); err == nil {
			t.Errorf("%q was accepted", bad)
		}
	}
}

// FormatConfig writes what ParseConfig reads back, field for field.
func TestFormatConfigRoundTrip(t *testing.T) {
	c := Config{DataDir: "/srv/vtpmd", HostName: "h", PoolSize: new(0), DefaultTPMVersion: spec.V12, LogLevel: slog.LevelError,
		StaleAfter: 90 * time.Second, InsecureListen: true, PCRBanks: []string{"sha256", "sha384"},
		Libvirt: LibvirtConfig{EnableVTPM: true}, Xen: XenConfig{ImageDir: "/x", GroupCapacity: 3}}
	c.Defaults()
	back, err := ParseConfig(FormatConfig(c, RoleAllInOne), RoleAllInOne)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, c) {
		t.Errorf("read back %+v\nwrote     %+v\n%s", back, c, FormatConfig(c, RoleAllInOne))
	}
	if !strings.Contains(string(FormatConfig(c, RoleAllInOne)), "stale-after: 1m30s\n") {
		t.Errorf("durations are not written as such:\n%s", FormatConfig(c, RoleAllInOne))
	}
}

// Redacted hides passwords and whatever follows a webhook's host, keeps
// user and host names, and Validate refuses a redacted webhook URL.
func TestRedacted(t *testing.T) {
	for _, c := range []struct {
		in   Config
		want Config
	}{
		{Config{Store: "postgres://vtpmd:s3cret@db.example/vtpmd?sslmode=verify-full&sslpassword=k3y"},
			Config{Store: "postgres://vtpmd:REDACTED@db.example/vtpmd?sslmode=verify-full&sslpassword=REDACTED"}},
		{Config{Store: "host=db user=vtpmd password='s3 cret' sslpassword=k3y dbname=vtpmd"},
			Config{Store: "host=db user=vtpmd password=REDACTED sslpassword=REDACTED dbname=vtpmd"}},
		{Config{Store: "postgres://vtpmd@db.example/vtpmd"}, Config{Store: "postgres://vtpmd@db.example/vtpmd"}},
		{Config{WebhookURL: "https://u:s3cret@hooks.example/services/T0/B0/t0ken?sig=x#f"},
			Config{WebhookURL: "https://u:REDACTED@hooks.example/REDACTED"}},
		{Config{WebhookURL: "https://hooks.example/"}, Config{WebhookURL: "https://hooks.example/"}},
		{Config{WebhookURL: "%%s3cret"}, Config{WebhookURL: "REDACTED"}},
		{Config{PublicURL: "https://a:s3cret@vtpmd.example:8780/p", HyperVHGS: "https://hgs.example/KeyProtection"},
			Config{PublicURL: "https://a:REDACTED@vtpmd.example:8780/p", HyperVHGS: "https://hgs.example/KeyProtection"}},
	} {
		if got := c.in.Redacted(); !reflect.DeepEqual(got, c.want) {
			t.Errorf("%+v redacted: %+v, want %+v", c.in, got, c.want)
		}
	}
	fed := Config{DataDir: "/var/lib/vtpmd", HostName: "h", WebhookURL: "https://hooks.example/REDACTED"}
	fed.Defaults()
	if err := fed.Validate(); err == nil || !strings.Contains(err.Error(), "redacted") {
		t.Errorf("a redacted webhook URL: %v", err)
	}
}
