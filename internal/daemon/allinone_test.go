package daemon

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// daemonUnderTest runs an all-in-one daemon on dir; stop ends it like a
// clean shutdown.
type daemonUnderTest struct {
	d      *AllInOne
	c      *client.Client // the operator, on its socket
	agents *client.Client // the network API, as agents (and strangers) reach it
	cancel context.CancelFunc
	done   chan error
}

func startDaemon(t *testing.T, dir string) *daemonUnderTest {
	t.Helper()
	return startConfigured(t, Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "test-host"})
}

// startConfigured runs an all-in-one daemon with cfg until the test ends.
// Unless cfg asks for a pool, it keeps none: a test's TPMs are made on
// demand; unless cfg asks for periodic backups, none are taken.
func startConfigured(t testing.TB, cfg Config) *daemonUnderTest {
	t.Helper()
	swtpmtest.Require(t)
	if cfg.PoolSize == nil {
		cfg.PoolSize = new(0)
	}
	if cfg.BackupInterval == nil { // a test takes the backups it needs
		cfg.BackupInterval = new(time.Duration(0))
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := StartAllInOne(ctx, cfg, nil)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	u := &daemonUnderTest{d: d, c: client.New(d.OperatorURL, ""), agents: client.New(d.URL, ""), cancel: cancel, done: make(chan error, 1)}
	go func() { u.done <- d.Run(ctx) }()
	t.Cleanup(u.stop)
	return u
}

func (u *daemonUnderTest) stop() {
	if u.cancel == nil {
		return
	}
	u.cancel()
	<-u.done
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u.d.Shutdown(ctx)
	u.cancel = nil
}

func (u *daemonUnderTest) create(t *testing.T, id, version string) api.VTPM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := u.c.Create(ctx, api.CreateVTPMRequest{InstanceID: id, Project: "p1",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": version}}})
	if err != nil {
		t.Fatalf("create %s: %v", id, err)
	}
	return u.wait(t, id, "active")
}

// attach attaches vTPM id to a libvirt domain and waits until it is
// active there (the guest started).
func (u *daemonUnderTest) attach(t *testing.T, id, domain string) api.VTPM {
	t.Helper()
	if _, err := u.c.Attach(context.Background(), id, domain); err != nil {
		t.Fatalf("attach %s to %s: %v", id, domain, err)
	}
	return u.wait(t, id, "active")
}

func (u *daemonUnderTest) wait(t testing.TB, id, phase string) api.VTPM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	v, err := u.c.Wait(ctx, id, func(v api.VTPM) bool { return v.Phase == phase || v.Phase == "error" }, nil)
	if err != nil || v.Phase != phase {
		t.Fatalf("waiting for %s to be %s: %v (phase %s, reason %q)", id, phase, err, v.Phase, v.Reason)
	}
	return v
}

// waitGone waits until the record of a deleted vTPM is gone.
func (u *daemonUnderTest) waitGone(t testing.TB, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := u.c.Wait(ctx, id, func(api.VTPM) bool { return false }, nil); !client.IsNotFound(err) {
		t.Fatalf("%s after delete: %v", id, err)
	}
}

// withTPM runs fn with a TPM 2.0 client on a vTPM's data socket. swtpm
// serves one data connection at a time, so the connection is closed after.
func withTPM(t *testing.T, sock string, fn func(transport.TPM)) {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	fn(swtpm.Retrying(transport.FromReadWriter(conn)))
}

func nvRead(t *testing.T, tpm transport.TPM, index uint32) []byte {
	t.Helper()
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(tpm)
	if err != nil {
		t.Fatalf("NV_ReadPublic 0x%x: %v", index, err)
	}
	contents, err := pub.NVPublic.Contents()
	if err != nil {
		t.Fatal(err)
	}
	auth := tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: pub.NVName}
	var out []byte
	for off := uint16(0); off < contents.DataSize; {
		n := min(contents.DataSize-off, 512)
		r, err := tpm2.NVRead{AuthHandle: auth, NVIndex: auth, Size: n, Offset: off}.Execute(tpm)
		if err != nil {
			t.Fatalf("NV_Read 0x%x at %d: %v", index, off, err)
		}
		out = append(out, r.Data.Buffer...)
		off += n
	}
	return out
}

const userIndex = 0x01500001

func nvWrite(t *testing.T, tpm transport.TPM, data []byte) {
	t.Helper()
	pub := tpm2.New2B(tpm2.TPMSNVPublic{
		NVIndex: tpm2.TPMHandle(userIndex), NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, AuthWrite: true, NT: tpm2.TPMNTOrdinary},
		DataSize:   uint16(len(data)),
	})
	if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: pub}).Execute(tpm); err != nil {
		t.Fatalf("NV_DefineSpace: %v", err)
	}
	rp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(userIndex)}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	h := tpm2.NamedHandle{Handle: tpm2.TPMHandle(userIndex), Name: rp.NVName}
	if _, err := (tpm2.NVWrite{AuthHandle: h, NVIndex: h, Data: tpm2.TPM2BMaxNVBuffer{Buffer: data}}).Execute(tpm); err != nil {
		t.Fatalf("NV_Write: %v", err)
	}
}

// checkIdentity verifies each EK certificate in NV against the deployment
// CA and against the key the TPM itself holds at the EK handle.
func checkIdentity(t *testing.T, c *client.Client, v api.VTPM) {
	t.Helper()
	ctx := context.Background()
	chainPEM, err := c.CA(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(chainPEM) {
		t.Fatalf("GET /v1/ca is not PEM: %q", chainPEM)
	}
	id, err := c.Identity(ctx, v.InstanceID)
	if err != nil {
		t.Fatal(err)
	}
	if len(id.EKs) != 2 {
		t.Fatalf("want RSA and ECC EKs, got %+v", id.EKs)
	}
	withTPM(t, v.Sockets.Data, func(tpm transport.TPM) { checkEKs(t, tpm, id, pool) })
}

func checkEKs(t *testing.T, tpm transport.TPM, id api.Identity, pool *x509.CertPool) {
	t.Helper()
	for _, ek := range id.EKs {
		var handle, index uint32
		for _, p := range []struct {
			s string
			v *uint32
		}{{ek.Handle, &handle}, {ek.NVIndex, &index}} {
			if _, err := fmt.Sscanf(p.s, "0x%x", p.v); err != nil {
				t.Fatalf("bad handle %q: %v", p.s, err)
			}
		}
		der := nvRead(t, tpm, index)
		if b, _ := pem.Decode([]byte(ek.CertificatePEM)); b == nil || !bytes.Equal(b.Bytes, der) {
			t.Fatalf("identity API and NV disagree on the %s certificate", ek.Kind)
		}
		cert, profile, err := ca.VerifyEK(der, ca.VerifyOptions{Roots: pool})
		if err != nil {
			t.Fatalf("%s EK cert in NV 0x%x does not verify against GET /v1/ca: %v", ek.Kind, index, err)
		}
		if profile.Model != "swtpm" || profile.TPMVersion != "2.0" {
			t.Fatalf("EK profile %+v", profile)
		}
		rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(handle)}.Execute(tpm)
		if err != nil {
			t.Fatalf("ReadPublic 0x%x: %v", handle, err)
		}
		pub, err := rp.OutPublic.Contents()
		if err != nil {
			t.Fatal(err)
		}
		key, err := tpm2.Pub(*pub)
		if err != nil {
			t.Fatal(err)
		}
		tpmKey, _ := x509.MarshalPKIXPublicKey(key)
		certKey, _ := x509.MarshalPKIXPublicKey(cert.PublicKey)
		if !bytes.Equal(tpmKey, certKey) {
			t.Fatalf("%s EK certificate certifies a key other than the TPM's EK", ek.Kind)
		}
	}
}

func readUserNV(t *testing.T, v api.VTPM) (data []byte) {
	t.Helper()
	withTPM(t, v.Sockets.Data, func(tpm transport.TPM) { data = nvRead(t, tpm, userIndex) })
	return data
}

func TestAllInOneLifecycle(t *testing.T) {
	dir := t.TempDir()
	u := startDaemon(t, dir)
	id20 := "0a0a0a0a-0000-4000-8000-000000000020"
	v := u.create(t, id20, "2.0")
	if v.Sockets == nil || v.Sockets.Data != filepath.Join(dir, "vtpms", id20, "tpm.sock") || v.Sockets.Ctrl != v.Sockets.Data+".ctrl" {
		t.Fatalf("sockets: %+v", v.Sockets)
	}
	// The host as its agent registered it and keeps it alive.
	hosts, err := u.c.Hosts(context.Background())
	if err != nil || len(hosts.Items) != 1 || hosts.Items[0].Name != "test-host" || hosts.Items[0].State != "up" ||
		hosts.Items[0].Version == "" || time.Since(hosts.Items[0].LastHeartbeat) > time.Minute || hosts.Items[0].Used != 1 {
		t.Fatalf("hosts: %+v, %v", hosts.Items, err)
	}
	checkIdentity(t, u.c, v)

	// The state on disk is encrypted: the EK certificate's bytes are public,
	// so finding them in swtpm's state file would mean plaintext.
	id, _ := u.c.Identity(context.Background(), id20)
	cert, _ := pem.Decode([]byte(id.EKs[0].CertificatePEM))
	state, err := os.ReadFile(filepath.Join(dir, "vtpms", id20, "tpm2-00.permall"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(state, cert.Bytes) || bytes.Contains(state, cert.Bytes[len(cert.Bytes)-64:]) {
		t.Fatal("swtpm state holds the EK certificate in plaintext")
	}
	if info, _ := os.Stat(filepath.Join(dir, "vtpms", id20)); info.Mode().Perm() != 0o700 {
		t.Fatalf("state dir mode %v", info.Mode().Perm())
	}

	secret := []byte("kept-across-restarts")
	withTPM(t, v.Sockets.Data, func(tpm transport.TPM) { nvWrite(t, tpm, secret) })

	// Stop and start: same TPM, data kept; no sockets while stopped.
	if _, err := u.c.Stop(context.Background(), id20); err != nil {
		t.Fatal(err)
	}
	if stopped := u.wait(t, id20, "stopped"); stopped.Sockets != nil {
		t.Fatalf("a stopped vTPM shows sockets %+v", stopped.Sockets)
	}
	if pid := u.d.Swtpm().Running(id20); pid != 0 {
		t.Fatalf("swtpm %d still running after stop", pid)
	}
	if _, err := u.c.Start(context.Background(), id20); err != nil {
		t.Fatal(err)
	}
	v = u.wait(t, id20, "active")
	if got := readUserNV(t, v); !bytes.Equal(got, secret) {
		t.Fatalf("NV after stop/start = %q", got)
	}

	// kill -9 of swtpm: supervised back, state intact.
	pid := u.d.Swtpm().Running(id20)
	syscall.Kill(pid, syscall.SIGKILL)
	deadline := time.Now().Add(10 * time.Second)
	for u.d.Swtpm().Running(id20) == pid || u.d.Swtpm().Running(id20) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("swtpm did not come back after kill -9")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := readUserNV(t, v); !bytes.Equal(got, secret) {
		t.Fatalf("NV after kill -9 = %q", got)
	}

	// Restart the daemon: the vTPM comes back with its data.
	u.stop()
	swtpmtest.CheckNoProcesses(t, dir)
	u = startDaemon(t, dir)
	v = u.wait(t, id20, "active")
	if got := readUserNV(t, v); !bytes.Equal(got, secret) {
		t.Fatalf("NV after daemon restart = %q", got)
	}

	// Delete: state, secret and record are gone.
	if _, err := u.c.Delete(context.Background(), id20); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = u.c.Wait(ctx, id20, func(api.VTPM) bool { return false }, nil)
	if !client.IsNotFound(err) {
		t.Fatalf("after delete: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "vtpms", id20)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("state dir remains: %v", err)
	}
	keys, _ := os.ReadDir(filepath.Join(dir, "keys"))
	for _, k := range keys {
		if strings.HasPrefix(k.Name(), v.SecretRef) {
			t.Fatalf("secret %s remains", k.Name())
		}
	}
}

func TestAllInOneTPM12(t *testing.T) {
	u := startDaemon(t, t.TempDir())
	id12 := "0a0a0a0a-0000-4000-8000-000000000012"
	v := u.create(t, id12, "1.2")
	if v.Spec.Version != "1.2" || u.d.Swtpm().Running(id12) == 0 {
		t.Fatalf("1.2 vTPM: %+v", v)
	}
}

// Secrets tenants store through the API are theirs: a restart, which
// reclaims vTPM secrets no record refers to, keeps them.
func TestTenantSecretsSurviveRestart(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "h1"}
	u := startConfigured(t, cfg)
	ctx := context.Background()
	s, err := client.New(u.d.OperatorURL, "p1").CreateSecret(ctx, api.CreateSecretRequest{Payload: "owner guardian PFX, base64"})
	if err != nil {
		t.Fatal(err)
	}
	u.stop()
	u = startConfigured(t, cfg)
	if got, err := u.c.Secret(ctx, s.ID); err != nil || got.Project != "p1" {
		t.Fatalf("the tenant's secret after a restart: %+v %v", got, err)
	}
}

// TestAllInOnePostgres keeps the store in PostgreSQL: a vTPM made, still
// there after a restart, deleted. A password in the connection string is
// refused (it would show in argv).
func TestAllInOnePostgres(t *testing.T) {
	dsn := pgtest.DSN(t)
	dir := t.TempDir()
	cfg := Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "pg-host", Store: dsn}
	u := startConfigured(t, cfg)
	id := "0d0d0d0d-0000-4000-8000-0000000000d0"
	if v := u.create(t, id, "2.0"); v.Phase != "active" {
		t.Fatalf("created: %+v", v)
	}
	if _, err := os.Stat(filepath.Join(dir, "vtpmd.db")); err == nil {
		t.Fatal("a SQLite store was made beside PostgreSQL")
	}
	u.stop()
	u = startConfigured(t, cfg)
	if got, err := u.c.Get(context.Background(), id); err != nil || got.Phase != "active" {
		t.Fatalf("after a restart: %+v %v", got, err)
	}
	if _, err := u.c.Delete(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	u.waitGone(t, id)

	for _, bad := range []string{"postgres://vtpmd:hunter2@localhost/vtpmd", "host=/tmp dbname=x password=hunter2", "postgres://[::1"} {
		_, err := StartAllInOne(context.Background(), Config{DataDir: t.TempDir(), Listen: "127.0.0.1:0", Store: bad}, nil)
		if err == nil || strings.Contains(err.Error(), "hunter2") {
			t.Errorf("store %q: %v", bad, err)
		}
	}
}
