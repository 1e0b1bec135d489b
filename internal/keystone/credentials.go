package keystone

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.yaml.in/yaml/v3"
)

// Credentials is what authenticates to Keystone: one cloud of a
// clouds.yaml, or the OS_* variables of an openrc file. Either a token or a
// user name (or ID) and password; the scope is the system (SystemScope
// "all"), a project (by ID, or by name in its domain), or none.
type Credentials struct {
	AuthURL           string `yaml:"auth_url"`
	Username          string `yaml:"username"`
	UserID            string `yaml:"user_id"`
	Password          string `yaml:"password"`
	ProjectName       string `yaml:"project_name"`
	ProjectID         string `yaml:"project_id"`
	UserDomainName    string `yaml:"user_domain_name"`
	UserDomainID      string `yaml:"user_domain_id"`
	ProjectDomainName string `yaml:"project_domain_name"`
	ProjectDomainID   string `yaml:"project_domain_id"`
	SystemScope       string `yaml:"system_scope"`
	Token             string `yaml:"token"`
	// RegionName picks catalog endpoints of one region; "" takes any.
	RegionName string `yaml:"-"`
	// Interface picks catalog endpoints: "public" (when ""), "internal" or
	// "admin".
	Interface string `yaml:"-"`
	// CACert is a PEM file of the CAs that sign Keystone's and the other
	// services' TLS certificates; "" trusts the system's.
	CACert string `yaml:"-"`
}

// String names the identity without its secrets.
func (c Credentials) String() string {
	who := c.Username
	if who == "" {
		who = c.UserID
	}
	if who == "" && c.Token != "" {
		who = "(token)"
	}
	scope := ""
	switch {
	case c.SystemScope != "":
		scope = " system:" + c.SystemScope
	case c.ProjectID != "":
		scope = " project " + c.ProjectID
	case c.ProjectName != "":
		scope = " project " + c.ProjectName
	}
	return "keystone " + c.AuthURL + " " + who + scope
}

// Check reports credentials that cannot authenticate, wrapping ErrIncomplete.
func (c Credentials) Check() error {
	switch {
	case c.AuthURL == "":
		return fmt.Errorf("%w: no auth URL", ErrIncomplete)
	case c.Token == "" && c.Username == "" && c.UserID == "":
		return fmt.Errorf("%w: neither a token nor a user name", ErrIncomplete)
	case c.Token == "" && c.Password == "":
		return fmt.Errorf("%w: no password for %s", ErrIncomplete, c.user())
	}
	return nil
}

// HTTPClient returns a client for Keystone and the services of its catalog
// that trusts c.CACert's CAs (the system's when unset) and gives up on a
// request after timeout.
func (c Credentials) HTTPClient(timeout time.Duration) (*http.Client, error) {
	client := &http.Client{Timeout: timeout}
	if c.CACert == "" {
		return client, nil
	}
	pem, err := os.ReadFile(c.CACert)
	if err != nil {
		return nil, fmt.Errorf("reading the CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("CA file %s holds no PEM certificate", c.CACert)
	}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	client.Transport = t
	return client, nil
}

func (c Credentials) user() string {
	if c.Username != "" {
		return "user " + c.Username
	}
	return "user " + c.UserID
}

// cloud is one entry of clouds.yaml, and the shape of vtpmd's own service
// credentials file.
type cloud struct {
	Auth       Credentials `yaml:"auth"`
	RegionName string      `yaml:"region_name"`
	Interface  string      `yaml:"interface"`
	CACert     string      `yaml:"cacert"`
}

func (c cloud) credentials() Credentials {
	cr := c.Auth
	cr.RegionName = c.RegionName
	cr.Interface = strings.TrimSuffix(c.Interface, "URL") // "publicURL" is the old spelling
	cr.CACert = c.CACert
	return cr
}

// CloudsFiles lists where the openstack CLI looks for clouds.yaml, in
// order: $OS_CLIENT_CONFIG_FILE, ./clouds.yaml,
// ~/.config/openstack/clouds.yaml, /etc/openstack/clouds.yaml.
func CloudsFiles() []string {
	var out []string
	if f := os.Getenv("OS_CLIENT_CONFIG_FILE"); f != "" {
		out = append(out, f)
	}
	out = append(out, "clouds.yaml")
	if home, err := os.UserHomeDir(); err == nil {
		out = append(out, filepath.Join(home, ".config", "openstack", "clouds.yaml"))
	}
	return append(out, "/etc/openstack/clouds.yaml")
}

// LoadCloud reads cloud name from the clouds.yaml at path, or, when path is
// "", from the first of CloudsFiles that exists. A missing cloud or file
// wraps ErrNoCloud.
func LoadCloud(path, name string) (Credentials, error) {
	if path == "" {
		for _, p := range CloudsFiles() {
			if _, err := os.Stat(p); err == nil {
				path = p
				break
			}
		}
		if path == "" {
			return Credentials{}, fmt.Errorf("%w: cloud %q: no clouds.yaml in %s", ErrNoCloud, name, strings.Join(CloudsFiles(), ", "))
		}
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Credentials{}, fmt.Errorf("%w: %w", ErrNoCloud, err)
	}
	if err != nil {
		return Credentials{}, err
	}
	var doc struct {
		Clouds map[string]cloud `yaml:"clouds"`
	}
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return Credentials{}, fmt.Errorf("reading %s: %w", path, err)
	}
	c, ok := doc.Clouds[name]
	if !ok {
		return Credentials{}, fmt.Errorf("%w: no cloud %q in %s", ErrNoCloud, name, path)
	}
	return c.credentials(), nil
}

// FromEnv reads credentials the way the openstack CLI does: the cloud
// OS_CLOUD names, if set (from clouds.yaml, see LoadCloud), with any OS_*
// variable set overriding its value; else the OS_* variables alone
// (OS_AUTH_URL, OS_USERNAME, OS_USER_ID, OS_PASSWORD, OS_PROJECT_NAME,
// OS_PROJECT_ID, OS_USER_DOMAIN_NAME, OS_USER_DOMAIN_ID,
// OS_PROJECT_DOMAIN_NAME, OS_PROJECT_DOMAIN_ID, OS_SYSTEM_SCOPE, OS_TOKEN,
// OS_REGION_NAME, OS_INTERFACE, OS_CACERT). ok is false when neither OS_CLOUD nor
// OS_AUTH_URL is set.
func FromEnv() (c Credentials, ok bool, err error) {
	return FromCloudEnv(os.Getenv("OS_CLOUD"))
}

// FromCloudEnv is FromEnv with cloud (a command's --os-cloud) in place of
// OS_CLOUD.
func FromCloudEnv(cloud string) (c Credentials, ok bool, err error) {
	if name := cloud; name != "" {
		if c, err = LoadCloud("", name); err != nil {
			return Credentials{}, true, err
		}
	} else if os.Getenv("OS_AUTH_URL") == "" {
		return Credentials{}, false, nil
	}
	for v, f := range map[string]*string{
		"OS_AUTH_URL":            &c.AuthURL,
		"OS_USERNAME":            &c.Username,
		"OS_USER_ID":             &c.UserID,
		"OS_PASSWORD":            &c.Password,
		"OS_PROJECT_NAME":        &c.ProjectName,
		"OS_PROJECT_ID":          &c.ProjectID,
		"OS_USER_DOMAIN_NAME":    &c.UserDomainName,
		"OS_USER_DOMAIN_ID":      &c.UserDomainID,
		"OS_PROJECT_DOMAIN_NAME": &c.ProjectDomainName,
		"OS_PROJECT_DOMAIN_ID":   &c.ProjectDomainID,
		"OS_SYSTEM_SCOPE":        &c.SystemScope,
		"OS_TOKEN":               &c.Token,
		"OS_REGION_NAME":         &c.RegionName,
		"OS_INTERFACE":           &c.Interface,
		"OS_CACERT":              &c.CACert,
	} {
		if s := os.Getenv(v); s != "" {
			*f = s
		}
	}
	// openrc files of older releases name the tenant.
	if c.ProjectName == "" && c.ProjectID == "" {
		c.ProjectName, c.ProjectID = os.Getenv("OS_TENANT_NAME"), os.Getenv("OS_TENANT_ID")
	}
	c.Interface = strings.TrimSuffix(c.Interface, "URL")
	return c, true, nil
}

// maxCredentialsFile bounds a credentials file's size.
const maxCredentialsFile = 64 << 10

// ReadCredentialsFile reads a service's own credentials: one clouds.yaml
// cloud entry as a file of its own, an "auth:" mapping plus region_name
// and interface:
//
//	auth:
//	  auth_url: http://keystone:5000/v3
//	  username: vtpmd
//	  password: …
//	  project_name: service
//	  user_domain_name: Default
//	  project_domain_name: Default
//	region_name: RegionOne
//	cacert: /etc/ssl/certs/cloud-ca.pem   # optional
//
// Like the master key, it refuses with ErrInsecureFile a file that group
// or others can access, a symlink, or not a regular file. The caller may
// set the auth URL (a service's own flag) and checks the result with
// Credentials.Check.
func ReadCredentialsFile(path string) (Credentials, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if errors.Is(err, syscall.ELOOP) {
		return Credentials{}, fmt.Errorf("%w: %s is a symlink", ErrInsecureFile, path)
	}
	if err != nil {
		return Credentials{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return Credentials{}, err
	}
	if !fi.Mode().IsRegular() {
		return Credentials{}, fmt.Errorf("%w: %s is not a regular file", ErrInsecureFile, path)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return Credentials{}, fmt.Errorf("%w: %s has mode %#o, want 0600", ErrInsecureFile, path, fi.Mode().Perm())
	}
	data, err := io.ReadAll(io.LimitReader(f, maxCredentialsFile+1))
	if err != nil {
		return Credentials{}, fmt.Errorf("reading %s: %w", path, err)
	}
	if len(data) > maxCredentialsFile {
		return Credentials{}, fmt.Errorf("%s is larger than %d bytes", path, maxCredentialsFile)
	}
	var c cloud
	dec := yaml.NewDecoder(strings.NewReader(string(data)))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		return Credentials{}, fmt.Errorf("reading %s: %w", path, err)
	}
	return c.credentials(), nil
}
