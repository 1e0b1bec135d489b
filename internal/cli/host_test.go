package cli

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/server/servertest"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
)

// hostsServer runs the real API on a real store with two hosts and no
// agent: h1, registered now by an agent v1.2.3, and h2, whose agent was
// last heard from two minutes ago (registered through a store whose clock
// was then).
func hostsServer(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	traits := spec.HostTraits(spec.Capabilities{Enabled: true, Models: []spec.Model{spec.TIS}}).List()
	register := func(opts store.Options, h *store.Host) *store.Store {
		t.Helper()
		st, err := store.Open(ctx, filepath.Join(dir, "db"), opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Update(ctx, func(tx *store.Tx) error { return tx.PutHost(h) }); err != nil {
			t.Fatal(err)
		}
		return st
	}
	then := func() time.Time { return time.Now().Add(-2 * time.Minute) }
	register(store.Options{Now: then}, &store.Host{Name: "h2", Traits: traits, Capacity: 5, Backend: "swtpm", Version: "v1.1.0"}).Close()
	st := register(store.Options{}, &store.Host{Name: "h1", Traits: traits, Capacity: 5, Backend: "libvirt", Version: "v1.2.3"})
	t.Cleanup(func() { st.Close() })
	kr, err := embedded.Open(context.Background(), st, filepath.Join(dir, "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	return servertest.Operator(t, servertest.New(t, st, kr).Handler())
}

// TestHostCommands: vtpmctl hosts shows each host's state, use, capacity,
// last heartbeat and version; host drain and undrain change what
// placement may use, repeat harmlessly and print the host; refusals exit
// with their status.
func TestHostCommands(t *testing.T) {
	base := []string{"--server", hostsServer(t)}
	code, out, errOut := run(t, append(base, "hosts")...)
	if code != ExitOK {
		t.Fatalf("hosts: %d %q", code, errOut)
	}
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^HOST +BACKEND +STATE +USED +CAPACITY +LAST HEARTBEAT +VERSION +CERTS +TRAITS$`),
		regexp.MustCompile(`(?m)^h1 +libvirt +up +0 +5 +\d+s ago +v1\.2\.3 +0 +COMPUTE_SECURITY_TPM`),
		regexp.MustCompile(`(?m)^h2 +swtpm +down +0 +5 +2m\d+s ago +v1\.1\.0 +0 +COMPUTE_SECURITY_TPM`),
	} {
		if !want.MatchString(out) {
			t.Fatalf("hosts table does not match %s:\n%s", want, out)
		}
	}
	var hosts []api.Host
	if code, out, _ := run(t, append(base, "hosts", "-o", "json")...); code != ExitOK || json.Unmarshal([]byte(out), &hosts) != nil ||
		len(hosts) != 2 || hosts[0].State != "up" || hosts[1].State != "down" || hosts[1].LastHeartbeat.After(time.Now().Add(-2*time.Minute)) {
		t.Fatalf("hosts -o json: %d %q", code, out)
	}

	create := func(id string) (int, string) {
		code, out, errOut := run(t, append(base, "create", "--instance", id, "--for-project", "p1", "--flavor-spec", "hw:tpm_version=2.0", "--wait=false")...)
		return code, out + errOut
	}
	for range 2 {
		if code, out, errOut := run(t, append(base, "host", "drain", "h1")...); code != ExitOK || !regexp.MustCompile(`(?m)^STATE +draining$`).MatchString(out) {
			t.Fatalf("host drain h1: %d %q %q", code, out, errOut)
		}
	}
	if code, out := create("66666666-0000-4000-8000-000000000001"); code != ExitConflict || !strings.Contains(out, string(api.CodeNoValidHost)) {
		t.Fatalf("create with h1 draining and h2 down: %d %q", code, out)
	}
	var h api.Host
	if code, out, _ := run(t, append(base, "host", "drain", "h2", "-o", "json")...); code != ExitOK || json.Unmarshal([]byte(out), &h) != nil || h.State != "down" || !h.Draining {
		t.Fatalf("host drain h2 -o json: %d %q", code, out)
	}
	if code, out, _ := run(t, append(base, "hosts")...); code != ExitOK || !regexp.MustCompile(`(?m)^h2 +swtpm +down,draining `).MatchString(out) {
		t.Fatalf("hosts with h2 down and drained: %d\n%s", code, out)
	}
	if code, out, errOut := run(t, append(base, "host", "undrain", "h1")...); code != ExitOK || !regexp.MustCompile(`(?m)^STATE +up$`).MatchString(out) {
		t.Fatalf("host undrain h1: %d %q %q", code, out, errOut)
	}
	if code, out := create("66666666-0000-4000-8000-000000000001"); code != ExitOK {
		t.Fatalf("create once h1 is undrained: %d %q", code, out)
	}

	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"host", "drain", "h9"}, ExitNotFound, string(api.CodeNotFound)},
		{[]string{"host", "undrain", "h9"}, ExitNotFound, string(api.CodeNotFound)},
		{[]string{"--project", "p1", "host", "drain", "h1"}, ExitFailed, string(api.CodeForbidden)},
		{[]string{"--project", "p1", "host", "undrain", "h2"}, ExitFailed, string(api.CodeForbidden)},
		{[]string{"host", "drain"}, ExitUsage, "exactly one argument"},
		{[]string{"host", "undrain", "h1", "h2"}, ExitUsage, "exactly one argument"},
	} {
		code, out, errOut := run(t, append(base, c.args...)...)
		if code != c.code || !strings.Contains(out+errOut, c.want) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want exit %d and %q", c.args, code, out, errOut, c.code, c.want)
		}
	}
}

// TestHostAddShowRevoke: host add prints a join token (or writes it to a
// private file), the new host reads down with no certificate until its
// agent enrols; revoke stops its certificate and its unused tokens.
func TestHostAddShowRevoke(t *testing.T) {
	server := hostsServer(t)
	base := []string{"--server", server}
	code, token, errOut := run(t, append(base, "host", "add", "new1", "--ttl", "10m")...)
	token = strings.TrimSpace(token)
	if code != ExitOK || len(token) != 43 || !strings.Contains(errOut, "one use") {
		t.Fatalf("host add: %d %q %q", code, token, errOut)
	}
	code, out, errOut := run(t, append(base, "host", "show", "new1")...)
	for _, want := range []string{`(?m)^STATE +down$`, `(?m)^BACKEND +-$`, `(?m)^LAST HEARTBEAT +-$`, `(?m)^CERTIFICATES +0$`} {
		if code != ExitOK || !regexp.MustCompile(want).MatchString(out) {
			t.Fatalf("host show of an added host does not match %s: %d %q %q", want, code, out, errOut)
		}
	}

	file := filepath.Join(t.TempDir(), "token")
	if code, out, errOut := run(t, append(base, "host", "add", "new1", "--token-file", file)...); code != ExitOK || strings.Contains(out, "\n\n") || !strings.Contains(out, file) {
		t.Fatalf("host add --token-file: %d %q %q", code, out, errOut)
	}
	fi, err := os.Stat(file)
	data, _ := os.ReadFile(file)
	if err != nil || fi.Mode().Perm() != 0o600 || len(strings.TrimSpace(string(data))) != 43 || strings.Contains(out, strings.TrimSpace(string(data))) {
		t.Fatalf("token file: %v %v %q", fi.Mode(), err, data)
	}

	// The host's agent enrols with the first token.
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if _, err := client.New(server, "").Enroll(context.Background(), api.EnrollRequest{JoinToken: token, CSR: csr}); err != nil {
		t.Fatal(err)
	}
	if code, out, _ := run(t, append(base, "host", "show", "new1")...); code != ExitOK || !regexp.MustCompile(`(?m)^CERTIFICATES +1$`).MatchString(out) {
		t.Fatalf("host show after enrolment: %d %q", code, out)
	}
	if code, out, errOut := run(t, append(base, "host", "revoke", "new1")...); code != ExitOK || !strings.Contains(out, "1 certificates revoked, 1 unused join tokens deleted") {
		t.Fatalf("host revoke: %d %q %q", code, out, errOut)
	}
	if code, out, _ := run(t, append(base, "hosts")...); code != ExitOK || !regexp.MustCompile(`(?m)^new1 +- +down +0 +0 +- +- +0 +-$`).MatchString(out) {
		t.Fatalf("hosts after revoke: %d %q", code, out)
	}
	for _, c := range []struct {
		args []string
		code int
	}{
		{[]string{"host", "revoke", "nope"}, ExitNotFound},
		{[]string{"host", "show", "nope"}, ExitNotFound},
		{[]string{"host", "add", "bad:name"}, ExitFailed},
		{[]string{"host", "add", "h3", "--ttl", "48h"}, ExitFailed},
		{[]string{"host", "add"}, ExitUsage},
	} {
		if code, out, errOut := run(t, append(base, c.args...)...); code != c.code {
			t.Errorf("%v: %d, want %d: %q %q", c.args, code, c.code, out, errOut)
		}
	}
}
