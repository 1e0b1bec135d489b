package daemon

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

// TestReplicasShareKeys: two server replicas started at the same moment on
// one empty PostgreSQL, each with its own data dir and its own copy of the
// master key file, hold one deployment: a host certificate replica A
// issues opens replica B's agent routes, both publish the same CA and
// verdict keys, and a secret made through one opens through the other.
func TestReplicasShareKeys(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	dsn := pgtest.DSN(t)
	caFile, certFile, keyFile := writeTestPKI(t, dir)
	master := filepath.Join(dir, "master.key")
	if _, err := embedded.NewMasterKeyFile(master); err != nil {
		t.Fatal(err)
	}
	key, _ := os.ReadFile(master)
	cfgs := make([]Config, 2)
	for i := range cfgs {
		data := filepath.Join(dir, string(rune('a'+i)))
		if err := os.MkdirAll(data, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(data, "master.key"), key, 0o600); err != nil {
			t.Fatal(err)
		}
		cfgs[i] = Config{DataDir: data, Listen: "127.0.0.1:0", HostName: "control", Store: dsn, TLSCert: certFile, TLSKey: keyFile}
	}
	servers := make([]*Server, 2)
	errs := make([]error, 2)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range servers {
		wg.Go(func() {
			<-start
			servers[i], errs[i] = StartServer(ctx, cfgs[i], nil)
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
		t.Cleanup(func() { servers[i].Shutdown(ctx) })
	}
	a, b := servers[0], servers[1]

	roots, err := client.LoadCAs(caFile)
	if err != nil {
		t.Fatal(err)
	}
	trust := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	// A host enrolled at A is an agent at B.
	cert, err := enrolSim(ctx, client.New(a.OperatorURL, ""), client.New(a.URL, "").WithTLS(trust), "hv1")
	if err != nil {
		t.Fatal(err)
	}
	mtls := trust.Clone()
	mtls.Certificates = []tls.Certificate{cert}
	if err := client.New(b.URL, "").WithTLS(mtls).Heartbeat(ctx, api.HeartbeatRequest{Version: "v1"}); err != nil {
		t.Fatalf("a heartbeat at B with the certificate A issued: %v", err)
	}

	// One deployment CA, one verdict key.
	for _, path := range []string{"/v1/ca", "/.well-known/vtpmd/jwks.json"} {
		fromA, fromB := get(t, a, trust, path), get(t, b, trust, path)
		if len(fromA) == 0 || !bytes.Equal(fromA, fromB) {
			t.Errorf("%s differs between the replicas:\n%s\n%s", path, fromA, fromB)
		}
	}

	// The key manager's secrets open at both.
	id, err := a.keyring.Create(ctx, "p1", "", []byte("shared secret"))
	if err != nil {
		t.Fatal(err)
	}
	if s, err := b.keyring.Get(ctx, id); err != nil || string(s.Payload) != "shared secret" {
		t.Fatalf("a secret made at A, read at B: %v", err)
	}
}

func get(t *testing.T, s *Server, trust *tls.Config, path string) []byte {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: trust, ForceAttemptHTTP2: true}}
	resp, err := c.Get(s.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %s", path, resp.StatusCode, body)
	}
	return body
}

// Replicas racing on an empty store make the deployment's keys once: every
// one of them gets the same CAs, verdict key and ticket key.
func TestSharedKeysMadeOnce(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.DSN(t)
	master := filepath.Join(t.TempDir(), "master.key")
	if _, err := embedded.NewMasterKeyFile(master); err != nil {
		t.Fatal(err)
	}
	const replicas = 4
	keys := make([]sharedKeys, replicas)
	errs := make([]error, replicas)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range keys {
		wg.Go(func() {
			st, err := store.OpenPostgres(ctx, dsn, store.Options{})
			if err != nil {
				errs[i] = err
				return
			}
			defer st.Close()
			<-start
			_, keys[i], errs[i] = openKeys(ctx, Config{DataDir: t.TempDir(), MasterKeyFile: master}, st, nil)
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
	}
	for i, k := range keys[1:] {
		if !k.ekCA.Certificate().Equal(keys[0].ekCA.Certificate()) || !k.hostCA.Certificate().Equal(keys[0].hostCA.Certificate()) ||
			!bytes.Equal(k.verdicts.JWKS(), keys[0].verdicts.JWKS()) || !bytes.Equal(k.ticketKey, keys[0].ticketKey) {
			t.Fatalf("replica %d holds other keys than replica 0", i+1)
		}
	}
	if keys[0].ekCA.Certificate().Equal(keys[0].hostCA.Certificate()) {
		t.Fatal("the deployment CA and the host CA are one")
	}
}

// /healthz says alive without the store; /readyz checks the database, the
// schema and the keys: after a master key rotation a replica whose key
// file still holds the old key reads not ready (503, naming keys), and
// ready again once its file holds the new one, without a restart.
func TestReadiness(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := StartServer(ctx, Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "control"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(ctx)
	ready := func(want int) api.Readiness {
		t.Helper()
		resp, err := http.Get(s.URL + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var r api.Readiness
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil || resp.StatusCode != want {
			t.Fatalf("/readyz: %d, %v; want %d", resp.StatusCode, err, want)
		}
		return r
	}
	r := ready(200)
	var names []string
	for _, c := range r.Checks {
		names = append(names, c.Name)
	}
	if !r.Ready || !slices.Equal(names, []string{"database", "schema", "keys"}) {
		t.Fatalf("/readyz: %+v", r)
	}
	if resp, err := http.Get(s.URL + "/healthz"); err != nil || resp.StatusCode != 200 {
		t.Fatalf("/healthz: %v %v", resp, err)
	}

	next := filepath.Join(t.TempDir(), "next.key")
	rot, err := RotateMasterKey(ctx, Config{DataDir: dir}, next)
	if err != nil || rot.Resealed < 4 || rot.From == rot.To {
		t.Fatalf("RotateMasterKey = %+v, %v", rot, err)
	}
	r = ready(503)
	if r.Ready || r.Checks[0].Ready != true || r.Checks[2].Ready || r.Checks[2].Message == "" {
		t.Fatalf("/readyz after a rotation with the old key file: %+v", r)
	}
	t.Logf("not ready: %+v", r.Checks[2])
	data, _ := os.ReadFile(next)
	if err := os.WriteFile(filepath.Join(dir, "master.key"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	ready(200)
	// The rotated store opens with the new key at the next start too, and
	// its old data (the CA) with it.
	caBefore, _ := client.New(s.OperatorURL, "").CA(ctx)
	if again, err := RotateMasterKey(ctx, Config{DataDir: dir}, next); err != nil || again.Resealed != 0 {
		t.Fatalf("rotating again to the same key: %+v, %v", again, err)
	}
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	s, err = StartServer(ctx, Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "control"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if caAfter, err := client.New(s.OperatorURL, "").CA(ctx); err != nil || !bytes.Equal(caAfter, caBefore) {
		t.Fatalf("the CA after a rotation and a restart: %v", err)
	}
}
