// Package ostest gives tests the real Keystone and Barbican that
// scripts/openstack-up.sh runs on this machine (Keystone on
// 127.0.0.1:5000, Barbican on 127.0.0.1:9311, Debian's packages): Up runs
// the script once per test binary and reads the clouds it made (admin,
// admin-system, vtpmd, vtpmd-a, vtpmd-b, vtpmd-a-reader); Token gets a
// cloud's token; StopBarbican and StartBarbican make an outage. Without
// them (no Debian packages to install, no root) the test is skipped, and
// fails under CI=true.
//
// Keystone and Barbican are one pair for the whole machine, shared by
// every test binary at once: a test isolates itself by what it creates
// (names, secrets), never by a fresh server. For the one thing that is
// not shareable, an outage, each test binary holds a shared lock from Up
// on, and StopBarbican waits for the exclusive one: while Barbican is
// down no other test binary is using it, and none starts to.
package ostest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/vtpmd/vtpmd/internal/citest"
)

// Env is where the running Keystone and Barbican are.
type Env struct {
	KeystoneURL string // Keystone's identity API, http://127.0.0.1:5000/v3
	BarbicanURL string // Barbican's root, http://127.0.0.1:9311
	CloudsFile  string // clouds.yaml in the openstack CLI's format
	clouds      map[string]Cloud
}

// Cloud is one cloud of clouds.yaml: a user's password credentials and
// the scope of its tokens, a project or (SystemScope "all") the system.
type Cloud struct {
	AuthURL           string `yaml:"auth_url"`
	Username          string `yaml:"username"`
	Password          string `yaml:"password"`
	ProjectName       string `yaml:"project_name"`
	UserDomainName    string `yaml:"user_domain_name"`
	ProjectDomainName string `yaml:"project_domain_name"`
	SystemScope       string `yaml:"system_scope"`
}

// Cloud returns the cloud called name (admin, admin-system, vtpmd,
// vtpmd-a, vtpmd-b or vtpmd-a-reader); any other name is a bug in the
// test, and panics.
func (e Env) Cloud(name string) Cloud {
	c, ok := e.clouds[name]
	if !ok {
		panic(fmt.Sprintf("ostest: no cloud %q in %s", name, e.CloudsFile))
	}
	return c
}

var (
	once   sync.Once
	env    Env
	upErr  error
	script string   // scripts/openstack-up.sh
	lock   *os.File // the outage lock, held shared from Up on

	mu      sync.Mutex
	stopped bool // by StopBarbican, until StartBarbican
)

// Up brings Keystone and Barbican up (once per test binary) and returns
// where they are. Without them the test is skipped, and fails under
// CI=true.
func Up(t testing.TB) Env {
	t.Helper()
	once.Do(func() { env, upErr = up() })
	if upErr != nil {
		citest.Missing(t, "Keystone and Barbican (scripts/openstack-up.sh): %v", upErr)
	}
	return env
}

func up() (Env, error) {
	root, err := moduleRoot()
	if err != nil {
		return Env{}, err
	}
	script = filepath.Join(root, "scripts", "openstack-up.sh")
	state := os.Getenv("OPENSTACK_STATE")
	if state == "" {
		state = "/var/lib/vtpmd-openstack"
	}
	if err := os.MkdirAll(state, 0o700); err != nil {
		return Env{}, err
	}
	if lock, err = os.OpenFile(filepath.Join(state, "outage.lock"), os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		return Env{}, err
	}
	if err := flock(syscall.LOCK_SH); err != nil {
		return Env{}, err
	}
	out, err := run("up")
	if err != nil {
		return Env{}, err
	}
	var e Env
	for _, field := range strings.Fields(out) {
		k, v, _ := strings.Cut(field, "=")
		switch k {
		case "keystone":
			e.KeystoneURL = v
		case "barbican":
			e.BarbicanURL = v
		case "clouds":
			e.CloudsFile = v
		}
	}
	if e.KeystoneURL == "" || e.BarbicanURL == "" || e.CloudsFile == "" {
		return Env{}, fmt.Errorf("%s printed %q, not keystone=… barbican=… clouds=…", script, out)
	}
	e.clouds, err = readClouds(e.CloudsFile)
	return e, err
}

// run runs the script with the subcommand, returning its stdout.
func run(subcommand string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(script, subcommand)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %v\n%s", script, subcommand, err, stderr.Bytes())
	}
	return strings.TrimSpace(stdout.String()), nil
}

func flock(how int) error {
	for {
		err := syscall.Flock(int(lock.Fd()), how)
		if !errors.Is(err, syscall.EINTR) {
			return err
		}
	}
}

// moduleRoot is the nearest directory above the working directory (a
// test's package directory) with a go.mod.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

func readClouds(path string) (map[string]Cloud, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var file struct {
		Clouds map[string]struct {
			Auth Cloud `yaml:"auth"`
		} `yaml:"clouds"`
	}
	if err := yaml.Unmarshal(data, &file); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	clouds := make(map[string]Cloud, len(file.Clouds))
	for name, c := range file.Clouds {
		clouds[name] = c.Auth
	}
	return clouds, nil
}

// Token returns a new token of the cloud's user, scoped as the cloud
// says (POST /v3/auth/tokens, the password method).
func Token(t testing.TB, c Cloud) string {
	t.Helper()
	user := map[string]any{"name": c.Username, "password": c.Password, "domain": map[string]string{"name": c.UserDomainName}}
	scope := map[string]any{"system": map[string]bool{c.SystemScope: true}}
	if c.SystemScope == "" {
		scope = map[string]any{"project": map[string]any{"name": c.ProjectName, "domain": map[string]string{"name": c.ProjectDomainName}}}
	}
	body, err := json.Marshal(map[string]any{"auth": map[string]any{
		"identity": map[string]any{"methods": []string{"password"}, "password": map[string]any{"user": user}},
		"scope":    scope,
	}})
	if err != nil {
		t.Fatal(err)
	}
	client := http.Client{Timeout: time.Minute}
	resp, err := client.Post(strings.TrimSuffix(c.AuthURL, "/")+"/auth/tokens", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatalf("token for %s: %v", c.Username, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("token for %s: %s", c.Username, resp.Status)
	}
	tok := resp.Header.Get("X-Subject-Token")
	if tok == "" {
		t.Fatalf("token for %s: no X-Subject-Token", c.Username)
	}
	return tok
}

// StopBarbican stops Barbican (its uWSGI, by pid file), once no other
// test binary uses it, until StartBarbican or the test's end. Keystone
// keeps running, and Barbican's data is kept. No other test of this
// binary may use Barbican meanwhile: none runs in parallel with it.
func StopBarbican(t testing.TB) {
	t.Helper()
	Up(t)
	mu.Lock()
	defer mu.Unlock()
	if err := flock(syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	stopped = true
	t.Cleanup(func() { StartBarbican(t) })
	if _, err := run("stop-barbican"); err != nil {
		t.Fatal(err)
	}
}

// StartBarbican starts Barbican again after StopBarbican, waits until it
// answers, and lets other test binaries use it again. Without a
// StopBarbican before, it does nothing.
func StartBarbican(t testing.TB) {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	if !stopped {
		return
	}
	if _, err := run("start-barbican"); err != nil {
		t.Fatal(err)
	}
	stopped = false
	if err := flock(syscall.LOCK_SH); err != nil {
		t.Fatal(err)
	}
}
