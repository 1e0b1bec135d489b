package daemon

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keystone"
	"github.com/vtpmd/vtpmd/internal/ostest"
)

// vtpmd server --auth keystone reads its service user's file (0600 only)
// and takes Keystone tokens on the network address.
func TestServerKeystoneAuth(t *testing.T) {
	ctx := context.Background()
	svc, err := keystone.LoadCloud(ostest.Up(t).CloudsFile, "vtpmd")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	file := filepath.Join(dir, "keystone.yaml")
	body := "auth:\n  username: " + svc.Username + "\n  password: " + svc.Password + "\n  project_name: " + svc.ProjectName +
		"\n  user_domain_name: Default\n  project_domain_name: Default\nregion_name: RegionOne\n"
	if err := os.WriteFile(file, []byte(body), 0o640); err != nil {
		t.Fatal(err)
	}
	cfg := Config{DataDir: filepath.Join(dir, "data"), Listen: "127.0.0.1:0", HostName: "control",
		Auth: "keystone", KeystoneURL: svc.AuthURL, KeystoneCredentialsFile: file}
	if _, err := StartServer(ctx, cfg, nil); !errors.Is(err, keystone.ErrInsecureFile) || strings.Contains(err.Error(), svc.Password) {
		t.Fatalf("a group-readable credentials file: %v", err)
	}
	if err := os.Chmod(file, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := StartServer(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(ctx)

	user, err := keystone.LoadCloud(ostest.Up(t).CloudsFile, "vtpmd-a")
	if err != nil {
		t.Fatal(err)
	}
	tok, err := keystone.NewSession(user, nil).Token(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		token string
		want  int
	}{{tok, 200}, {"", 401}, {"bogus", 401}} {
		req, _ := http.NewRequest("GET", s.URL+"/v1/vtpms", nil)
		if c.token != "" {
			req.Header.Set(api.TokenHeader, c.token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("token %q: %d, want %d", c.token[:min(len(c.token), 5)], resp.StatusCode, c.want)
		}
	}
}
