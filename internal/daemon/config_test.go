package daemon

import (
	"strings"
	"testing"
	"time"
)

// TestConfigValidate: each bad setting is named, all at once; the defaults
// are valid.
func TestConfigValidate(t *testing.T) {
	ok := Config{DataDir: "/var/lib/vtpmd", HostName: "h"}
	ok.Defaults()
	if err := ok.Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	external := Config{Backend: "libvirt", Libvirt: LibvirtConfig{Mode: "external"}, HostName: "h"}
	external.Defaults()
	if err := external.Validate(); err != nil || external.SocketDir != "/run/vtpmd" {
		t.Fatalf("libvirt external defaults: socket dir %q, %v", external.SocketDir, err)
	}
	bad := ok
	bad.DataDir, bad.Capacity, bad.PCRBanks = "relative", -1, []string{"md5"}
	bad.SwtpmUser, bad.SocketGroup = "no-such-user-here", "no-such-group-here"
	bad.Backend, bad.Libvirt.Mode = "hyper-v", "passthrough"
	bad.TLSCert, bad.Store = "cert.pem", "postgres://u:secret@db/vtpmd"
	err := bad.Validate()
	if err == nil {
		t.Fatal("a bad configuration was accepted")
	}
	for _, want := range []string{
		`data dir "relative"`, "capacity -1", `PCR bank "md5"`, `swtpm user "no-such-user-here"`,
		`socket group "no-such-group-here"`, "a socket group needs a socket dir", `backend "hyper-v"`,
		`libvirt mode "passthrough"`, "TLS needs both", "carries a password",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the error does not name %s:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "u:secret") {
		t.Error("the error repeats the store's password")
	}
	relative := ok
	relative.SocketDir = "run/vtpmd"
	if err := relative.Validate(); err == nil || !strings.Contains(err.Error(), "socket dir") {
		t.Errorf("relative socket dir: %v", err)
	}
}

// TestStoreDSNMultiHost: the deployment guide's connection strings for a
// primary with a standby (every server named, target_session_attrs) are
// accepted in both forms; a password is refused in them as in any.
func TestStoreDSNMultiHost(t *testing.T) {
	for _, dsn := range []string{
		"host=db1.example.net,db2.example.net port=5432,5432 user=vtpmd dbname=vtpmd sslmode=verify-full target_session_attrs=read-write connect_timeout=3",
		"postgres://vtpmd@db1.example.net:5432,db2.example.net:5432/vtpmd?sslmode=verify-full&target_session_attrs=read-write&connect_timeout=3",
	} {
		if err := checkStoreDSN(dsn); err != nil {
			t.Errorf("%s: %v", dsn, err)
		}
	}
	for _, dsn := range []string{
		"host=db1.example,db2.example user=vtpmd password=s3cret dbname=vtpmd target_session_attrs=read-write",
		"postgres://vtpmd:s3cret@db1.example:5432,db2.example:5432/vtpmd?target_session_attrs=read-write",
	} {
		if err := checkStoreDSN(dsn); err == nil || !strings.Contains(err.Error(), "carries a password") {
			t.Errorf("%s: %v, want the password refused", dsn, err)
		}
	}
	if err := checkStoreDSN("host=db1.example,db2.example target_session_attrs=read-mostly"); err == nil {
		t.Error("an unknown target_session_attrs was accepted")
	}
}

// Beyond loopback the API needs TLS and client certificates, or the
// operator's explicit --insecure-listen.
func TestConfigListen(t *testing.T) {
	for _, c := range []struct {
		listen         string
		tls, clientCA  bool
		insecure, fine bool
	}{
		{"127.0.0.1:8780", false, false, false, true},
		{"[::1]:8780", false, false, false, true},
		{"localhost:8780", false, false, false, true},
		{"0.0.0.0:8780", false, false, false, false},
		{":8780", false, false, false, false},
		{"10.0.2.15:8780", true, false, false, false},
		{"[::]:8780", false, false, false, false},
		{"0.0.0.0:8780", true, true, false, true},
		{"0.0.0.0:8780", false, false, true, true},
	} {
		cfg := Config{DataDir: "/var/lib/vtpmd", HostName: "h", Listen: c.listen, InsecureListen: c.insecure}
		if c.tls {
			cfg.TLSCert, cfg.TLSKey = "api.pem", "api.key"
		}
		if c.clientCA {
			cfg.ClientCA = "clients.pem"
		}
		cfg.Defaults()
		err := cfg.Validate()
		if c.fine != (err == nil) || (err != nil && !strings.Contains(err.Error(), "--insecure-listen")) {
			t.Errorf("%s tls=%v client-ca=%v insecure=%v: %v", c.listen, c.tls, c.clientCA, c.insecure, err)
		}
	}
}

// Keystone authentication needs Keystone's URL and the service user's
// file, and serves the network with TLS in place of client certificates.
func TestConfigKeystone(t *testing.T) {
	c := Config{DataDir: "/var/lib/vtpmd", HostName: "h", Auth: "keystone"}
	c.Defaults()
	err := c.Validate()
	if err == nil || !strings.Contains(err.Error(), "--keystone-url") || !strings.Contains(err.Error(), "--keystone-credentials-file") {
		t.Errorf("keystone without URL and file: %v", err)
	}
	c.KeystoneURL, c.KeystoneCredentialsFile = "http://127.0.0.1:5000/v3", "/etc/vtpmd/keystone.yaml"
	c.Listen, c.TLSCert, c.TLSKey = "0.0.0.0:8780", "api.pem", "api.key"
	if err := c.Validate(); err != nil {
		t.Errorf("keystone with TLS beyond loopback: %v", err)
	}
	if c.KeystoneAdminProject != "admin" || c.KeystoneCacheTTL != time.Minute {
		t.Errorf("defaults: admin project %q, cache TTL %s", c.KeystoneAdminProject, c.KeystoneCacheTTL)
	}
	c.TLSCert, c.TLSKey = "", ""
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "not loopback") {
		t.Errorf("keystone beyond loopback without TLS: %v", err)
	}
	bad := Config{DataDir: "/var/lib/vtpmd", HostName: "h", Auth: "ldap", KeystoneCacheTTL: 2 * time.Hour}
	bad.Defaults()
	if err := bad.Validate(); err == nil || !strings.Contains(err.Error(), `auth "ldap"`) || !strings.Contains(err.Error(), "keystone-cache-ttl") {
		t.Errorf("bad auth and TTL: %v", err)
	}
}

// A host must be able to miss a heartbeat before it reads down: all-in-one,
// which has both settings, refuses a window no longer than its interval; a
// server's window and an agent's interval are each its own role's.
func TestConfigHeartbeats(t *testing.T) {
	c := Config{DataDir: "/var/lib/vtpmd", HostName: "h", HeartbeatInterval: 30 * time.Second, HeartbeatWindow: 20 * time.Second}
	c.Defaults()
	if err := c.ValidateRole(RoleAllInOne); err == nil || !strings.Contains(err.Error(), "heartbeat-window 20s must be longer than heartbeat-interval 30s") {
		t.Errorf("a window shorter than the interval: %v", err)
	}
	if _, err := StartAllInOne(t.Context(), c, nil); err == nil || !strings.Contains(err.Error(), "heartbeat-window 20s") {
		t.Errorf("StartAllInOne with a window shorter than the interval: %v", err)
	}
	for _, r := range []Role{RoleServer, RoleAgent} {
		if err := c.ValidateRole(r); err != nil {
			t.Errorf("%s: %v", r, err)
		}
	}
	c.HeartbeatInterval = -time.Second
	if err := c.ValidateRole(RoleAgent); err == nil || !strings.Contains(err.Error(), "heartbeat-interval -1s must be positive") {
		t.Errorf("a negative interval: %v", err)
	}
}

// The key manager is embedded by default; Barbican needs Keystone's URL
// and the service user's file (its token reaches Barbican), and a
// Barbican URL, if given, must be one.
func TestConfigKeyManager(t *testing.T) {
	c := Config{DataDir: "/var/lib/vtpmd", HostName: "h"}
	c.Defaults()
	if err := c.Validate(); err != nil || c.KeyManager != "embedded" {
		t.Fatalf("default key manager %q: %v", c.KeyManager, err)
	}
	c.KeyManager, c.BarbicanURL = "barbican", "barbican:9311"
	err := c.Validate()
	for _, want := range []string{"--keystone-url", "--keystone-credentials-file", `barbican url "barbican:9311"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("barbican without Keystone, with a bad URL: %v, want it to name %s", err, want)
		}
	}
	c.KeystoneURL, c.KeystoneCredentialsFile, c.BarbicanURL = "http://127.0.0.1:5000/v3", "/etc/vtpmd/keystone.yaml", ""
	if err := c.Validate(); err != nil {
		t.Errorf("barbican from the catalog: %v", err)
	}
	c.KeyManager = "vault"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), `key manager "vault"`) {
		t.Errorf("key manager vault: %v", err)
	}
}
