package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"go.yaml.in/yaml/v3"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/ostest"
	"github.com/vtpmd/vtpmd/internal/store"
)

// barbicanDaemon is an all-in-one daemon with Keystone authentication and
// Barbican as its key manager (or the embedded one, for comparison).
type barbicanDaemon struct {
	*daemonUnderTest
	os  ostest.Env
	dir string
}

// startBarbicanDaemon starts one with a pool of pool TPMs, its service
// user the vtpmd cloud's.
func startBarbicanDaemon(t testing.TB, keyManager string, pool int) *barbicanDaemon {
	return startBarbicanDaemonAs(t, keyManager, pool, "vtpmd")
}

// startBarbicanDaemonAs starts one whose service user is service's, its
// configuration changed by each of configure.
func startBarbicanDaemonAs(t testing.TB, keyManager string, pool int, service string, configure ...func(*Config)) *barbicanDaemon {
	t.Helper()
	env := ostest.Up(t)
	// A short data dir: swtpm's unix sockets live in it, and a benchmark's
	// t.TempDir() is too long for their paths.
	dir, err := os.MkdirTemp("", "vb-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "test-host", KeyManager: keyManager,
		PoolSize: &pool, Auth: "keystone", KeystoneURL: env.KeystoneURL, KeystoneCredentialsFile: serviceCredentials(t, env.Cloud(service))}
	for _, f := range configure {
		f(&cfg)
	}
	return &barbicanDaemon{daemonUnderTest: startConfigured(t, cfg), os: env, dir: dir}
}

// token is a new token of cloud's user.
func (d *barbicanDaemon) token(t testing.TB, cloud string) string {
	return ostest.Token(t, d.os.Cloud(cloud))
}

// serviceCredentials writes c as vtpmd's service credentials file.
func serviceCredentials(t testing.TB, c ostest.Cloud) string {
	t.Helper()
	out, err := yaml.Marshal(map[string]any{"auth": c, "region_name": "RegionOne"})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "keystone.yaml")
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// as is a client of the network API that authenticates with cloud's token.
func (d *barbicanDaemon) as(t testing.TB, cloud string) *client.Client {
	tok := d.token(t, cloud)
	return client.New(d.d.URL, "").WithIdentity(func(context.Context) (string, error) { return tok, nil })
}

// record is a vTPM's record.
func (d *barbicanDaemon) record(t testing.TB, id string) *store.VTPM {
	t.Helper()
	var v *store.VTPM
	if err := d.d.store.View(context.Background(), func(tx *store.Tx) (err error) { v, err = tx.GetVTPM(id); return err }); err != nil {
		t.Fatal(err)
	}
	return v
}

// keyManager is the daemon's Barbican key manager.
func (d *barbicanDaemon) keyManager(t testing.TB) keyring.Keyring {
	t.Helper()
	km, err := keyManager(context.Background(), d.d.cfg, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return km
}

// adoptedFromPool says a vTPM's events record a pooled TPM.
func (d *barbicanDaemon) adoptedFromPool(t testing.TB, id string) bool {
	t.Helper()
	v := d.record(t, id)
	var evs []store.Event
	if err := d.d.store.View(context.Background(), func(tx *store.Tx) (err error) { evs, err = tx.ListEvents(id, v.Incarnation); return err }); err != nil {
		t.Fatal(err)
	}
	for _, e := range evs {
		if e.Action == "adopted a pre-manufactured TPM" {
			return true
		}
	}
	return false
}

// secretOf is the key-manager secret a vTPM's record names.
func (d *barbicanDaemon) secretOf(t testing.TB, id string) string { return d.record(t, id).SecretID }

// castellanGet is Nova's read of a vTPM secret (castellan's two GETs): the
// status of the payload's read (or of the metadata's, if that fails) and
// the payload.
func castellanGet(t testing.TB, barbicanURL, token, id string) (int, []byte) {
	t.Helper()
	get := func(u, accept string) (int, []byte) {
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		req.Header.Set("X-Auth-Token", token)
		req.Header.Set("Accept", accept)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, b
	}
	status, body := get(barbicanURL+"/v1/secrets/"+id, "application/json")
	if status != http.StatusOK {
		return status, nil
	}
	var m struct {
		Name         string            `json:"name"`
		SecretType   string            `json:"secret_type"`
		ContentTypes map[string]string `json:"content_types"`
	}
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatal(err)
	}
	if m.SecretType != "passphrase" || !strings.HasPrefix(m.Name, "vTPM secret for instance ") {
		t.Errorf("secret %s: %s, want Nova's passphrase named for its instance", id, body)
	}
	return get(barbicanURL+"/v1/secrets/"+id+"/payload", m.ContentTypes["default"])
}

func createAs(ctx context.Context, c *client.Client, id, mode string) (api.VTPM, error) {
	return c.Create(ctx, api.CreateVTPMRequest{InstanceID: id,
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0", "hw:tpm_secret_security": mode}}})
}

// TestBarbicanSecrets: vTPM secrets are in Barbican, stored as Nova stores
// them: made by the create, read when the vTPM starts, shredded by the
// delete, owned as the mode says (deployment: vtpmd's service user;
// user: the creating project, read by no one else, vtpmd included). A user
// vTPM starts only at its owner's request: the operator's is refused with
// secret_needs_owner. With a pool, a deployment vTPM takes a pooled TPM
// (its secret stored in Barbican as the service); a user or host vTPM is
// manufactured with the secret its owner's create staged.
func TestBarbicanSecrets(t *testing.T) {
	ctx := context.Background()
	d := startBarbicanDaemon(t, "barbican", 2)
	member := d.as(t, "vtpmd-a")
	memberTok, otherTok, serviceTok := d.token(t, "vtpmd-a"), d.token(t, "vtpmd-b"), d.token(t, "vtpmd")

	for _, tc := range []struct {
		mode, owner, stranger string
	}{
		{"deployment", serviceTok, memberTok},
		{"user", memberTok, serviceTok},
		{"host", memberTok, otherTok},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			waitPool(t, d.dir, 1)
			id := uuid.NewString()
			if _, err := createAs(ctx, member, id, tc.mode); err != nil {
				t.Fatal(err)
			}
			d.wait(t, id, "active")
			if pooled := d.adoptedFromPool(t, id); pooled != (tc.mode == "deployment") {
				t.Errorf("a %s vTPM took a pooled TPM: %v", tc.mode, pooled)
			}
			secret := d.secretOf(t, id)
			status, payload := castellanGet(t, d.os.BarbicanURL, tc.owner, secret)
			if status != http.StatusOK || len(payload) != 512 {
				t.Fatalf("castellan's read as the owner: %d, %d bytes; want 200, 512", status, len(payload))
			}
			if status, _ := castellanGet(t, d.os.BarbicanURL, tc.stranger, secret); status != http.StatusForbidden {
				t.Fatalf("castellan's read as another project: %d, want 403", status)
			}

			if _, err := member.Stop(ctx, id); err != nil {
				t.Fatal(err)
			}
			d.wait(t, id, "stopped")
			_, err := d.c.Start(ctx, id) // the operator, with no token
			if tc.mode == "deployment" {
				if err != nil {
					t.Fatalf("the operator's start of a deployment vTPM: %v", err)
				}
			} else {
				if client.ErrorCode(err) != api.CodeSecretNeedsOwner {
					t.Fatalf("the operator's start of a %s vTPM: %v, want %s", tc.mode, err, api.CodeSecretNeedsOwner)
				}
				if _, err := member.Start(ctx, id); err != nil {
					t.Fatal(err)
				}
			}
			d.wait(t, id, "active")

			if _, err := member.Delete(ctx, id); err != nil {
				t.Fatal(err)
			}
			d.waitGone(t, id)
			if status, _ := castellanGet(t, d.os.BarbicanURL, tc.owner, secret); status != http.StatusNotFound {
				t.Fatalf("the secret after the delete: %d, want 404", status)
			}
		})
	}
}

// TestBarbicanOperatorDelete: the operator deletes a user vTPM, which
// goes; its secret stays in the owner's project (vtpmd cannot shred it),
// and the vTPM's last event says so.
func TestBarbicanOperatorDelete(t *testing.T) {
	ctx := context.Background()
	d := startBarbicanDaemon(t, "barbican", 0)
	member := d.as(t, "vtpmd-a")
	id := uuid.NewString()
	if _, err := createAs(ctx, member, id, "user"); err != nil {
		t.Fatal(err)
	}
	d.wait(t, id, "active")
	secret := d.secretOf(t, id)
	if _, err := d.c.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	d.waitGone(t, id)
	memberTok := d.token(t, "vtpmd-a")
	if status, _ := castellanGet(t, d.os.BarbicanURL, memberTok, secret); status != http.StatusOK {
		t.Fatalf("the owner's secret after the operator's delete: %d, want 200 (kept)", status)
	}
	var evs []store.Event
	if err := d.d.store.View(ctx, func(tx *store.Tx) (err error) { evs, err = tx.ListAllEvents(id); return err }); err != nil {
		t.Fatal(err)
	}
	said := false
	for _, e := range evs {
		said = said || strings.Contains(e.Detail, "stays in project")
	}
	if !said {
		t.Errorf("no event says the secret stayed: %+v", evs)
	}
	km := d.keyManager(t)
	if err := km.Delete(keyring.WithToken(ctx, memberTok), secret); err != nil {
		t.Fatalf("the owner's delete of its secret: %v", err)
	}
}

// TestBarbicanOutage: with Barbican stopped, creates fail with 503
// key_manager_unavailable and leave no record, running vTPMs keep running;
// once it is back, creates work again and the failed creates left no
// secret in Barbican, in the service's project or the owner's.
func TestBarbicanOutage(t *testing.T) {
	ctx := context.Background()
	d := startBarbicanDaemon(t, "barbican", 0)
	member := d.as(t, "vtpmd-a")
	running := uuid.NewString()
	if _, err := createAs(ctx, member, running, "deployment"); err != nil {
		t.Fatal(err)
	}
	d.wait(t, running, "active")
	pid := d.record(t, running).PID

	ostest.StopBarbican(t)
	failed := map[string]string{}
	for _, mode := range []string{"deployment", "user"} {
		id := uuid.NewString()
		failed[mode] = id
		_, err := createAs(ctx, member, id, mode)
		var e *client.Error
		if !errors.As(err, &e) || e.Status != http.StatusServiceUnavailable || e.Code != api.CodeKeyManagerUnavailable {
			t.Fatalf("create (%s) with Barbican down: %v, want 503 %s", mode, err, api.CodeKeyManagerUnavailable)
		}
		if _, err := d.c.Get(ctx, id); !client.IsNotFound(err) {
			t.Fatalf("the failed create left a record: %v", err)
		}
	}
	if v := d.record(t, running); v.Phase != store.PhaseActive || v.PID != pid || pid == 0 || syscall.Kill(pid, 0) != nil {
		t.Fatalf("the running vTPM with Barbican down: phase %s, swtpm pid %d (was %d)", v.Phase, v.PID, pid)
	}
	ostest.StartBarbican(t)

	after := uuid.NewString()
	if _, err := createAs(ctx, member, after, "deployment"); err != nil {
		t.Fatal(err)
	}
	d.wait(t, after, "active")
	for _, probe := range []struct{ cloud, mode string }{{"vtpmd", "deployment"}, {"vtpmd-a", "user"}} {
		if n := secretsNamed(t, d.os.BarbicanURL, d.token(t, probe.cloud), failed[probe.mode]); n != 0 {
			t.Errorf("%d secrets of the failed %s create are in Barbican", n, probe.mode)
		}
	}
}

// secretsNamed counts the secrets of the token's project in Barbican named
// for instance id.
func secretsNamed(t testing.TB, barbicanURL, token, id string) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, barbicanURL+"/v1/secrets?"+url.Values{"name": {keyring.VTPMSecretName(id)}}.Encode(), nil)
	req.Header.Set("X-Auth-Token", token)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var page struct {
		Total int `json:"total"`
	}
	if err := json.NewDecoder(res.Body).Decode(&page); err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("listing secrets by name: %d %v", res.StatusCode, err)
	}
	return page.Total
}

// BenchmarkCreateActive: a tenant's create until the vTPM is active (its
// TPM manufactured on demand, no pool), with Barbican and with the
// embedded key manager, both behind Keystone authentication; for the
// Barbican deployment and user modes (user: the secret staged for the
// agent too).
func BenchmarkCreateActive(b *testing.B) {
	for _, km := range []struct{ name, keyManager, mode string }{
		{"embedded", "embedded", "deployment"},
		{"barbican-deployment", "barbican", "deployment"},
		{"barbican-user", "barbican", "user"},
	} {
		b.Run(km.name, func(b *testing.B) {
			ctx := context.Background()
			d := startBarbicanDaemon(b, km.keyManager, 0)
			member := d.as(b, "vtpmd-a")
			var ids []string
			for b.Loop() {
				id := uuid.NewString()
				ids = append(ids, id)
				if _, err := createAs(ctx, member, id, km.mode); err != nil {
					b.Fatal(err)
				}
				d.wait(b, id, "active")
			}
			b.StopTimer()
			for _, id := range ids {
				if _, err := member.Delete(ctx, id); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestBarbicanOrphans: a create that loses its instance to another leaves
// no secret in Barbican (its own is deleted again, as the service's or the
// owner's); a deployment secret no record names (a create killed between
// Barbican and the store) is reclaimed by name and owner.
//
// Its daemon's service user is the admin cloud's, not vtpmd's: the reclaim
// deletes every secret its service user made that its store does not
// name, and other test binaries keep theirs as vtpmd meanwhile.
func TestBarbicanOrphans(t *testing.T) {
	ctx := context.Background()
	d := startBarbicanDaemonAs(t, "barbican", 0, "admin")
	member := d.as(t, "vtpmd-a")
	for _, tc := range []struct{ mode, cloud string }{{"deployment", "admin"}, {"user", "vtpmd-a"}} {
		id := uuid.NewString()
		errs := make(chan error, 2)
		for range 2 {
			go func() { _, err := createAs(ctx, member, id, tc.mode); errs <- err }()
		}
		var made int
		for range 2 {
			err := <-errs
			switch {
			case err == nil:
				made++
			case client.ErrorCode(err) != api.CodeAlreadyExists:
				t.Fatalf("a racing create (%s): %v", tc.mode, err)
			}
		}
		if made != 1 {
			t.Fatalf("%d of two racing creates (%s) succeeded", made, tc.mode)
		}
		d.wait(t, id, "active")
		if n := secretsNamed(t, d.os.BarbicanURL, d.token(t, tc.cloud), id); n != 1 {
			t.Errorf("%d secrets of the %s vTPM in Barbican, want 1", n, tc.mode)
		}
		if _, err := member.Delete(ctx, id); err != nil {
			t.Fatal(err)
		}
		d.waitGone(t, id)
	}

	km := d.keyManager(t)
	orphanOf := uuid.NewString()
	orphan, err := km.Create(ctx, "p1", keyring.VTPMSecretName(orphanOf), []byte("left by a crash"))
	if err != nil {
		t.Fatal(err)
	}
	kept := uuid.NewString()
	if _, err := createAs(ctx, member, kept, "deployment"); err != nil {
		t.Fatal(err)
	}
	d.wait(t, kept, "active")
	// Older than a few seconds: no other test's secret in flight is.
	time.Sleep(3 * time.Second)
	if err := reclaimSecrets(ctx, d.d.store, km, 2*time.Second, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	if _, err := km.Get(ctx, orphan); !errors.Is(err, keyring.ErrNotFound) {
		t.Fatalf("the orphan after the reclaim: %v", err)
	}
	if _, err := km.Get(ctx, d.secretOf(t, kept)); err != nil {
		t.Fatalf("a vTPM's secret after the reclaim: %v", err)
	}
}
