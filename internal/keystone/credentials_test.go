package keystone

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const cloudsYAML = `clouds:
  admin:
    auth:
      auth_url: http://127.0.0.1:5000/v3
      username: admin
      password: s3cret
      project_name: admin
      user_domain_name: Default
      project_domain_name: Default
    region_name: RegionOne
    interface: internal
    identity_api_version: 3
    cacert: /etc/ssl/cloud-ca.pem
  sys:
    auth:
      auth_url: http://127.0.0.1:5000
      username: admin
      password: s3cret
      system_scope: all
`

func writeFile(t *testing.T, name, body string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadCloud(t *testing.T) {
	p := writeFile(t, "clouds.yaml", cloudsYAML, 0o600)
	c, err := LoadCloud(p, "admin")
	if err != nil {
		t.Fatal(err)
	}
	want := Credentials{AuthURL: "http://127.0.0.1:5000/v3", Username: "admin", Password: "s3cret",
		ProjectName: "admin", UserDomainName: "Default", ProjectDomainName: "Default",
		RegionName: "RegionOne", Interface: "internal", CACert: "/etc/ssl/cloud-ca.pem"}
	if c != want {
		t.Errorf("LoadCloud = %+v, want %+v", c, want)
	}
	if _, err := LoadCloud(p, "nope"); !errors.Is(err, ErrNoCloud) {
		t.Errorf("missing cloud: %v, want ErrNoCloud", err)
	}
	if _, err := LoadCloud(filepath.Join(t.TempDir(), "none.yaml"), "admin"); !errors.Is(err, ErrNoCloud) {
		t.Errorf("missing file: %v, want ErrNoCloud", err)
	}
}

// The lookup order is the openstack CLI's: OS_CLIENT_CONFIG_FILE first,
// then ./clouds.yaml, then the user's.
func TestLoadCloudLookup(t *testing.T) {
	home := t.TempDir()
	t.Setenv("HOME", home)
	if err := os.MkdirAll(filepath.Join(home, ".config", "openstack"), 0o700); err != nil {
		t.Fatal(err)
	}
	user := strings.ReplaceAll(cloudsYAML, "username: admin", "username: from-home")
	if err := os.WriteFile(filepath.Join(home, ".config", "openstack", "clouds.yaml"), []byte(user), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Chdir(t.TempDir())
	t.Setenv("OS_CLIENT_CONFIG_FILE", "")
	if c, err := LoadCloud("", "admin"); err != nil || c.Username != "from-home" {
		t.Errorf("home clouds.yaml: %+v, %v", c, err)
	}
	if err := os.WriteFile("clouds.yaml", []byte(strings.ReplaceAll(cloudsYAML, "username: admin", "username: from-cwd")), 0o600); err != nil {
		t.Fatal(err)
	}
	if c, err := LoadCloud("", "admin"); err != nil || c.Username != "from-cwd" {
		t.Errorf("./clouds.yaml: %+v, %v", c, err)
	}
	t.Setenv("OS_CLIENT_CONFIG_FILE", writeFile(t, "c.yaml", strings.ReplaceAll(cloudsYAML, "username: admin", "username: from-env"), 0o600))
	if c, err := LoadCloud("", "admin"); err != nil || c.Username != "from-env" {
		t.Errorf("OS_CLIENT_CONFIG_FILE: %+v, %v", c, err)
	}
}

func clearOSEnv(t *testing.T) {
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "OS_") {
			t.Setenv(k, "")
		}
	}
}

func TestFromEnv(t *testing.T) {
	clearOSEnv(t)
	if _, ok, err := FromEnv(); ok || err != nil {
		t.Fatalf("no variables: ok %v, err %v", ok, err)
	}
	t.Setenv("OS_AUTH_URL", "http://ks:5000/v3")
	t.Setenv("OS_USERNAME", "alice")
	t.Setenv("OS_PASSWORD", "pw")
	t.Setenv("OS_PROJECT_ID", "abc")
	t.Setenv("OS_INTERFACE", "publicURL")
	t.Setenv("OS_CACERT", "/etc/ssl/ks-ca.pem")
	c, ok, err := FromEnv()
	want := Credentials{AuthURL: "http://ks:5000/v3", Username: "alice", Password: "pw", ProjectID: "abc", Interface: "public", CACert: "/etc/ssl/ks-ca.pem"}
	if !ok || err != nil || c != want {
		t.Errorf("FromEnv = %+v, %v, %v; want %+v", c, ok, err, want)
	}

	// OS_CLOUD picks the cloud; the variables set override it.
	clearOSEnv(t)
	t.Setenv("OS_CLIENT_CONFIG_FILE", writeFile(t, "clouds.yaml", cloudsYAML, 0o600))
	t.Setenv("OS_CLOUD", "sys")
	t.Setenv("OS_PASSWORD", "other")
	c, ok, err = FromEnv()
	if !ok || err != nil || c.SystemScope != "all" || c.Password != "other" || c.Username != "admin" {
		t.Errorf("OS_CLOUD: %+v, %v, %v", c, ok, err)
	}
	t.Setenv("OS_CLOUD", "nope")
	if _, _, err := FromEnv(); !errors.Is(err, ErrNoCloud) {
		t.Errorf("unknown OS_CLOUD: %v", err)
	}
}

const serviceFile = `auth:
  auth_url: http://127.0.0.1:5000/v3
  username: vtpmd
  password: pw
  project_name: service
  user_domain_name: Default
  project_domain_name: Default
region_name: RegionOne
`

func TestReadCredentialsFile(t *testing.T) {
	c, err := ReadCredentialsFile(writeFile(t, "svc.yaml", serviceFile, 0o600))
	if err != nil || c.Username != "vtpmd" || c.ProjectName != "service" || c.RegionName != "RegionOne" {
		t.Fatalf("ReadCredentialsFile = %+v, %v", c, err)
	}
	for _, mode := range []os.FileMode{0o640, 0o604} {
		if _, err := ReadCredentialsFile(writeFile(t, "svc.yaml", serviceFile, mode)); !errors.Is(err, ErrInsecureFile) {
			t.Errorf("mode %#o: %v, want ErrInsecureFile", mode, err)
		}
	}
	p := writeFile(t, "svc.yaml", serviceFile, 0o600)
	link := filepath.Join(t.TempDir(), "link.yaml")
	if err := os.Symlink(p, link); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadCredentialsFile(link); !errors.Is(err, ErrInsecureFile) {
		t.Errorf("symlink: %v, want ErrInsecureFile", err)
	}
	c, err = ReadCredentialsFile(writeFile(t, "svc.yaml", strings.ReplaceAll(serviceFile, "  password: pw\n", ""), 0o600))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Check(); !errors.Is(err, ErrIncomplete) {
		t.Errorf("no password: %v, want ErrIncomplete", err)
	}
	if _, err := ReadCredentialsFile(writeFile(t, "svc.yaml", serviceFile+"regoin: x\n", 0o600)); err == nil {
		t.Error("an unknown key was accepted")
	}
}

// The token request body is Keystone v3's, for each method and scope.
func TestAuthBody(t *testing.T) {
	for _, tc := range []struct {
		c    Credentials
		want string
	}{
		{Credentials{Username: "u", Password: "p", ProjectName: "pr", UserDomainName: "Default", ProjectDomainID: "default"},
			`{"identity":{"methods":["password"],"password":{"user":{"domain":{"name":"Default"},"name":"u","password":"p"}}},"scope":{"project":{"domain":{"id":"default"},"name":"pr"}}}`},
		{Credentials{Username: "u", Password: "p", SystemScope: "all"},
			`{"identity":{"methods":["password"],"password":{"user":{"domain":{"id":"default"},"name":"u","password":"p"}}},"scope":{"system":{"all":true}}}`},
		{Credentials{Token: "t", ProjectID: "x"},
			`{"identity":{"methods":["token"],"token":{"id":"t"}},"scope":{"project":{"id":"x"}}}`},
	} {
		got, _ := json.Marshal(authBody(tc.c))
		if string(got) != tc.want {
			t.Errorf("authBody(%+v) =\n%s\nwant\n%s", tc.c, got, tc.want)
		}
	}
}

// Credentials' String never shows the password or the token.
func TestCredentialsString(t *testing.T) {
	s := Credentials{AuthURL: "http://ks", Username: "u", Password: "hunter2", Token: "tok-secret", ProjectID: "p"}.String()
	if strings.Contains(s, "hunter2") || strings.Contains(s, "tok-secret") {
		t.Errorf("String() = %q shows a secret", s)
	}
}
