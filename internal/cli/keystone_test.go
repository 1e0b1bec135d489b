package cli

import (
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keystone"
	"github.com/vtpmd/vtpmd/internal/ostest"
	"github.com/vtpmd/vtpmd/internal/server"
)

// vtpmctl gets its own token from clouds.yaml (--os-cloud, OS_CLOUD) or
// the OS_* variables, as the openstack CLI does, and the API takes the
// project and role from it; no token or password ever shows.
func TestKeystoneCommands(t *testing.T) {
	clouds := ostest.Up(t).CloudsFile
	t.Setenv("OS_CLIENT_CONFIG_FILE", clouds)
	for _, v := range []string{"OS_CLOUD", "OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD", "OS_PROJECT_NAME", "OS_TOKEN", "VTPMD_CERT"} {
		t.Setenv(v, "")
	}
	svc, err := keystone.LoadCloud(clouds, "vtpmd")
	if err != nil {
		t.Fatal(err)
	}
	api0 := newAPI(t)
	api0.Identity = &server.Identity{Tokens: keystone.NewValidator(keystone.NewSession(svc, nil), keystone.ValidatorOptions{}), AdminProject: "admin"}
	srv := httptest.NewServer(api0.Handler())
	t.Cleanup(srv.Close)
	base := []string{"--server", srv.URL}
	const id = "5d6034eb-1da9-41b3-8cb0-6eed496331c6"

	code, out, errOut := run(t, append(base, "--os-cloud", "vtpmd-a", "create", "--instance", id, "--flavor-spec", "hw:tpm_version=2.0", "--wait=false", "-o", "json")...)
	var v api.VTPM
	if code != ExitOK || json.Unmarshal([]byte(out), &v) != nil || v.InstanceID != id || v.Project == "" {
		t.Fatalf("create as vtpmd-a: %d %q %q", code, out, errOut)
	}
	b, _ := keystone.LoadCloud(clouds, "vtpmd-b")
	cases := []struct {
		env  map[string]string
		args []string
		code int
		want string
	}{
		{nil, []string{"--os-cloud", "vtpmd-a", "show", id}, ExitOK, v.Project},
		{map[string]string{"OS_CLOUD": "vtpmd-a-reader"}, []string{"list"}, ExitOK, id},
		{nil, []string{"--os-cloud", "vtpmd-a-reader", "delete", id, "--wait=false"}, ExitFailed, string(api.CodeForbidden)},
		{nil, []string{"--os-cloud", "vtpmd-b", "show", id}, ExitNotFound, string(api.CodeNotFound)},
		{nil, []string{"--os-cloud", "admin-system", "list"}, ExitOK, id},
		{nil, []string{"--os-cloud", "vtpmd-a", "hosts"}, ExitFailed, string(api.CodeForbidden)},
		// An openrc file's variables.
		{map[string]string{"OS_AUTH_URL": b.AuthURL, "OS_USERNAME": b.Username, "OS_PASSWORD": b.Password, "OS_PROJECT_NAME": b.ProjectName,
			"OS_USER_DOMAIN_NAME": "Default", "OS_PROJECT_DOMAIN_NAME": "Default"}, []string{"show", id}, ExitNotFound, string(api.CodeNotFound)},
		// OS_PASSWORD overrides the cloud's: refused, and not shown.
		{map[string]string{"OS_PASSWORD": "wrong-password-123"}, []string{"--os-cloud", "vtpmd-a", "list"}, ExitFailed, "keystone refused the credentials"},
		{nil, []string{"--os-cloud", "no-such-cloud", "list"}, ExitUsage, "no-such-cloud"},
		// No token at all: the network API refuses.
		{nil, []string{"list"}, ExitFailed, string(api.CodeUnauthenticated)},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			for k, val := range c.env {
				t.Setenv(k, val)
			}
			code, out, errOut := run(t, append(base, c.args...)...)
			if code != c.code || !strings.Contains(out+errOut, c.want) {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit %d and %q", code, out, errOut, c.code, c.want)
			}
			for _, secret := range []string{b.Password, svc.Password, "wrong-password-123", "gAAAA"} {
				if strings.Contains(out+errOut, secret) {
					t.Errorf("the output shows a password or token: %q %q", out, errOut)
				}
			}
		})
	}
}
