package daemon

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"github.com/google/uuid"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// onStateSocket runs fn with the data socket of a swtpm of the test's own
// serving the TPM whose state is in dir (its vTPM stopped), keyed by
// secret on a pipe, as libvirt's swtpm is.
func onStateSocket(t *testing.T, dir string, secret []byte, fn func(sock string)) {
	t.Helper()
	i := swtpm.Instance{Dir: dir, Version: spec.V20, Secret: secret}
	p, err := swtpm.Start(context.Background(), i, nil)
	if err != nil {
		t.Fatalf("opening the state in %s: %v", dir, err)
	}
	defer p.Stop(context.Background())
	fn(i.DataSocket())
}

// writeNVCounted defines the test's NV index and counter through the TPM
// at sock with tpm2-tools, writes data to the index and increments the
// counter twice; it returns the counter's value.
func writeNVCounted(t *testing.T, sock string, data []byte) []byte {
	t.Helper()
	writeNV(t, sock, data, true)
	increment(t, sock)
	increment(t, sock)
	return readCounter(t, sock)
}

// dialLibvirt connects to the libvirtd at socket.
func dialLibvirt(t *testing.T, socket string) *golibvirt.Libvirt {
	t.Helper()
	lv := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket)))
	if err := lv.ConnectToURI(golibvirt.QEMUSystem); err != nil {
		t.Fatalf("connecting to libvirtd at %s: %v", socket, err)
	}
	t.Cleanup(func() { lv.Disconnect() })
	return lv
}

// libvirtSecret is the value of libvirt secret id in lv and whether it is
// ephemeral or private; ok is false when lv has no such secret.
func libvirtSecret(t *testing.T, lv *golibvirt.Libvirt, id string) (value []byte, hidden, ok bool) {
	t.Helper()
	s, err := lv.SecretLookupByUUID(golibvirt.UUID(uuid.MustParse(id)))
	if err != nil {
		return nil, false, false
	}
	xml, err := lv.SecretGetXMLDesc(s, 0)
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Secret
	if err := d.Unmarshal(xml); err != nil {
		t.Fatal(err)
	}
	value, err = lv.SecretGetValue(s, 0)
	if err != nil {
		t.Fatal(err)
	}
	return value, d.Ephemeral == "yes" || d.Private == "yes", true
}

// bootChecked starts the vTPM id, attached to its guest on the vTPM's
// host, waits for the guest's report of its TPM (printed by the test init
// to console) and checks it: its firmware measured the boot into the TPM,
// and the TPM is the one from before the move: the NV index and counter
// read data and counter, and its EK public key and certificate are
// before's.
func bootChecked(t *testing.T, c *cluster, id, console string, before api.Identity, data, counter []byte) {
	t.Helper()
	if _, err := c.op.Start(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "active")
	report := bootPCRs(t, console)
	if pcr0 := report["sha256:0"]; len(pcr0) != 64 || strings.Trim(pcr0, "0") == "" {
		t.Fatalf("the guest's PCR 0 = %q: the firmware measured nothing into its vTPM", pcr0)
	}
	ek, _ := pem.Decode([]byte(before.EKs[0].PublicKeyPEM))
	cert, _ := pem.Decode([]byte(before.EKs[0].CertificatePEM))
	if ek == nil || cert == nil || before.EKs[0].Kind != "rsa2048" {
		t.Fatalf("the vTPM's first EK before the move: %+v", before.EKs[0])
	}
	ekSum, certSum := sha256.Sum256(ek.Bytes), sha256.Sum256(cert.Bytes)
	for key, want := range map[string]string{
		"TPM EK sha256":     hex.EncodeToString(ekSum[:]),
		"TPM EKCERT sha256": hex.EncodeToString(certSum[:]),
		"TPM NV 0x1500016":  hex.EncodeToString(data),
		"TPM NV 0x1500017":  hex.EncodeToString(counter),
	} {
		if report[key] != want {
			t.Errorf("the guest reads %s = %q, want %q (before the move)", key, report[key], want)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

// migrateTo migrates the vTPM id to host, again while the server answers
// that the vTPM changed as the migration began (its agent reporting, say).
// It logs how long the migration that went through took.
func migrateTo(t *testing.T, c *cluster, id, host string) api.VTPM {
	t.Helper()
	for {
		start := time.Now()
		v, err := c.op.Migrate(context.Background(), id, api.MigrateRequest{Host: host})
		if client.ErrorCode(err) == api.CodeMigrationInProgress && strings.Contains(err.Error(), "changed while its migration began") {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("migrated %s to %s in %s", id, host, time.Since(start).Round(time.Millisecond))
		return v
	}
}

// TestClusterLibvirtMigrate moves the vTPM of a libvirt guest, cold,
// between two vtpmd agents, each with its own host name and data dir, in
// both modes of the libvirt backend: an NV index and an NV counter
// written through the vTPM before the move read the same in the guest,
// which boots on the new host with the TPM of before (its EK public key
// and certificate); the old host holds nothing of the vTPM afterwards.
func TestClusterLibvirtMigrate(t *testing.T) {
	t.Run("emulator", testLibvirtMigrateEmulator)
	t.Run("external", testLibvirtMigrateExternal)
}

// testLibvirtMigrateEmulator: libvirt runs swtpm, on the state in its own
// state directory (/var/lib/libvirt/swtpm/<domain UUID>), which is one per
// libvirtd. So the two hosts are two libvirtds: the machine's (lv-a) and
// a second one in a mount namespace of its own (lv-b; startOtherLibvirtd),
// whose agent runs in that namespace too. For each secret security, a
// vTPM moves from lv-a to lv-b: libvirt's state directory is made on
// lv-b, owned as libvirt's swtpm needs; with secret security host the
// libvirt secret is defined there, persistent, and with user and
// deployment it is not (vtpmd defines it for each start); on lv-a, the
// state and the libvirt secret are gone. The guest of user's boots on
// lv-a, then, moved, on lv-b; the others' TPMs are read through swtpm. Then host's vTPM is
// backed up, changed, restored, shelved and unshelved onto lv-a, backed up
// again, and evacuated from lv-a, lost, onto lv-b: its NV data comes back
// each time, and its libvirt secret goes with its state.
func testLibvirtMigrateEmulator(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	lv := connectLibvirt(t)
	other := startOtherLibvirtd(t)
	lv2 := dialLibvirt(t, other.socket)
	c := newCluster(t)
	ctx := context.Background()
	tss, err := user.Lookup("tss")
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(conf, []byte("swtpm-user: tss\nswtpm-group: tss\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	flags := []string{"--config", conf, "--backend", "libvirt", "--libvirt-mode", "emulator", "--enable-vtpm"}
	a := c.addAgent("lv-a", 4, flags...)
	c.addWrappedAgent(other.nsenter(), "lv-b", 4, append(flags, "--libvirt-socket", other.socket)...)
	kr := clusterKeyring(t, c)
	stateOn := map[string]func(id string) string{
		"lv-a": func(id string) string { return filepath.Join("/var/lib/libvirt/swtpm", id) },
		"lv-b": func(id string) string { return other.path(filepath.Join("/var/lib/libvirt/swtpm", id)) },
	}

	if _, err := c.op.DrainHost(ctx, "lv-b"); err != nil {
		t.Fatal(err)
	}
	type vtpm struct {
		id, secretSecurity string
		secret             []byte
		before             api.Identity
		data, counter      []byte
	}
	var vtpms []*vtpm
	for _, ss := range []string{"user", "host", "deployment"} {
		id := uuid.NewString()
		t.Cleanup(func() { os.RemoveAll(stateOn["lv-a"](id)) }) // if the test fails before the move
		if _, err := c.create(id, "hw:tpm_model", "tpm-crb", "hw:tpm_secret_security", ss); err != nil {
			t.Fatal(err)
		}
		v := c.wait(id, "active")
		if v.Host != "lv-a" {
			t.Fatalf("placed on %s", v.Host)
		}
		t.Cleanup(func() { // if the test fails with the secret defined on lv-a
			if s, err := lv.SecretLookupByUUID(golibvirt.UUID(uuid.MustParse(v.SecretRef))); err == nil {
				lv.SecretUndefine(s)
			}
		})
		if _, err := c.op.Stop(ctx, id); err != nil {
			t.Fatal(err)
		}
		c.wait(id, "stopped")
		secret, err := kr.Get(ctx, v.SecretRef)
		if err != nil {
			t.Fatal(err)
		}
		m := &vtpm{id: id, secretSecurity: ss, secret: secret.Payload, data: bytes.Repeat([]byte(ss[:1]), 32)}
		onStateSocket(t, filepath.Join(stateOn["lv-a"](id), "tpm2"), m.secret, func(sock string) { m.counter = writeNVCounted(t, sock, m.data) })
		if m.before, err = c.op.Identity(ctx, id); err != nil {
			t.Fatal(err)
		}
		vtpms = append(vtpms, m)
	}
	if _, err := c.op.UndrainHost(ctx, "lv-b"); err != nil {
		t.Fatal(err)
	}

	// The guest of the first (user) runs on lv-a first, libvirt's swtpm
	// taking the state the test wrote: what moves is a state libvirt's
	// swtpm wrote last. It is defined on lv-b too, the host it moves to,
	// as Nova defines it there (its files on storage both hosts share).
	gdir := t.TempDir()
	dom := defineGuest(t, lv, vtpms[0].id, gdir)
	defineGuest(t, lv2, vtpms[0].id, gdir)
	if _, err := c.op.Attach(ctx, vtpms[0].id, dom.Name); err != nil {
		t.Fatal(err)
	}
	console := filepath.Join(gdir, "console.log")
	bootChecked(t, c, vtpms[0].id, console, vtpms[0].before, vtpms[0].data, vtpms[0].counter)
	if _, err := c.op.Stop(ctx, vtpms[0].id); err != nil {
		t.Fatal(err)
	}
	c.wait(vtpms[0].id, "stopped")
	if err := os.Truncate(console, 0); err != nil { // the boot on lv-b writes its own report
		t.Fatal(err)
	}

	for _, m := range vtpms {
		t.Run(m.secretSecurity, func(t *testing.T) {
			moved := migrateTo(t, c, m.id, "lv-b")
			if moved.Host != "lv-b" || moved.Desired != "stopped" {
				t.Fatalf("after the migration: host %s, desired %s; want lv-b, stopped", moved.Host, moved.Desired)
			}
			sid, _ := c.op.Get(ctx, m.id)
			if _, err := os.Stat(stateOn["lv-a"](m.id)); !os.IsNotExist(err) {
				t.Fatalf("lv-a keeps libvirt's state directory of the vTPM: %v", err)
			}
			if _, _, ok := libvirtSecret(t, lv, sid.SecretRef); ok {
				t.Fatal("lv-a keeps the libvirt secret of the vTPM")
			}
			// libvirt's swtpm runs as tss (scripts/libvirtd-up.sh), and so
			// do the agents' (swtpm-user): the state is given to it, private,
			// as a manufactured state is.
			tpm2Dir := filepath.Join(stateOn["lv-b"](m.id), "tpm2")
			for p, mode := range map[string]os.FileMode{tpm2Dir: 0o700, filepath.Join(tpm2Dir, "tpm2-00.permall"): 0o600} {
				fi, err := os.Stat(p)
				if err != nil {
					t.Fatalf("lv-b lacks the state: %v", err)
				}
				if uid := fi.Sys().(*syscall.Stat_t).Uid; fi.Mode().Perm() != mode || strconv.Itoa(int(uid)) != tss.Uid {
					t.Fatalf("%s: mode %v, uid %d; want %v, tss (%s)", p, fi.Mode().Perm(), uid, mode, tss.Uid)
				}
			}
			value, hidden, ok := libvirtSecret(t, lv2, sid.SecretRef)
			switch {
			case m.secretSecurity == "host" && (!ok || hidden || !bytes.Equal(value, m.secret)):
				t.Fatalf("lv-b's libvirt secret in host mode: defined %v, ephemeral or private %v, the vTPM secret %v", ok, hidden, bytes.Equal(value, m.secret))
			case m.secretSecurity != "host" && ok:
				t.Fatalf("lv-b holds a libvirt secret of a vTPM with secret security %s", m.secretSecurity)
			}
			after, err := c.op.Identity(ctx, m.id)
			if err != nil {
				t.Fatal(err)
			}
			sameEKs(t, m.before, after)

			if m == vtpms[0] {
				bootChecked(t, c, m.id, console, m.before, m.data, m.counter)
				return
			}
			onStateSocket(t, tpm2Dir, m.secret, func(sock string) {
				if got := readNVData(t, sock); !bytes.Equal(got, m.data) {
					t.Fatalf("NV index on lv-b = %q, want %q", got, m.data)
				}
				if got := readCounter(t, sock); !bytes.Equal(got, m.counter) {
					t.Fatalf("NV counter on lv-b = %x, want %x", got, m.counter)
				}
			})
			ek, _ := pem.Decode([]byte(m.before.EKs[0].PublicKeyPEM))
			if got := rsaEK(t, tpm2Dir, m.secret); !bytes.Equal(got, ek.Bytes) {
				t.Fatal("the TPM on lv-b holds another EK than before the move")
			}
		})
	}

	// Backup and restore, shelve and unshelve, on libvirt hosts: the vTPM
	// of secret security host.
	m := vtpms[1]
	if _, err := c.op.CreateBackup(ctx, m.id); err != nil {
		t.Fatal(err)
	}
	readData := func(host string) []byte {
		var got []byte
		onStateSocket(t, filepath.Join(stateOn[host](m.id), "tpm2"), m.secret, func(sock string) { got = readNVData(t, sock) })
		return got
	}
	onStateSocket(t, filepath.Join(stateOn["lv-b"](m.id), "tpm2"), m.secret, func(sock string) {
		writeNV(t, sock, bytes.Repeat([]byte("X"), 32), false)
	})
	if _, err := c.op.RestoreBackup(ctx, m.id, api.RestoreRequest{}); err != nil {
		t.Fatal(err)
	}
	if got := readData("lv-b"); !bytes.Equal(got, m.data) {
		t.Fatalf("NV index after the restore = %q, want %q", got, m.data)
	}
	if s, err := c.op.Shelve(ctx, m.id); err != nil || s.Phase != "shelved" {
		t.Fatalf("shelve: %+v %v", s, err)
	}
	if _, err := os.Stat(stateOn["lv-b"](m.id)); !os.IsNotExist(err) {
		t.Fatalf("the state stayed on the host it was shelved from: %v", err)
	}
	rec, _ := c.op.Get(ctx, m.id)
	if _, _, ok := libvirtSecret(t, lv2, rec.SecretRef); ok {
		t.Fatal("the libvirt secret stayed on the host the vTPM was shelved from")
	}
	u, err := c.op.Unshelve(ctx, m.id, "lv-a")
	if err != nil || u.Host != "lv-a" {
		t.Fatalf("unshelve onto lv-a: %+v %v", u, err)
	}
	if got := readData("lv-a"); !bytes.Equal(got, m.data) {
		t.Fatalf("NV index after unshelve = %q, want %q", got, m.data)
	}
	if value, hidden, ok := libvirtSecret(t, lv, rec.SecretRef); !ok || hidden || !bytes.Equal(value, m.secret) {
		t.Fatalf("lv-a's libvirt secret after unshelve: defined %v, ephemeral or private %v", ok, hidden)
	}
	after, err := c.op.Identity(ctx, m.id)
	if err != nil {
		t.Fatal(err)
	}
	sameEKs(t, m.before, after)

	// lv-a is lost after a backup: its vTPM is restored on lv-b from it.
	if _, err := c.op.CreateBackup(ctx, m.id); err != nil {
		t.Fatal(err)
	}
	stop(a.cmd, syscall.SIGKILL)
	c.waitHost("lv-a", "down")
	ev, err := c.op.Evacuate(ctx, "lv-a", api.EvacuateRequest{}, nil)
	if err != nil || len(ev.Items) != 1 || ev.Items[0].Outcome != "restored" || ev.Items[0].Host != "lv-b" {
		t.Fatalf("evacuating lv-a: %+v %v", ev, err)
	}
	if got := readData("lv-b"); !bytes.Equal(got, m.data) {
		t.Fatalf("NV index after the evacuation = %q, want %q", got, m.data)
	}
	if value, hidden, ok := libvirtSecret(t, lv2, rec.SecretRef); !ok || hidden || !bytes.Equal(value, m.secret) {
		t.Fatalf("lv-b's libvirt secret after the evacuation: defined %v, ephemeral or private %v", ok, hidden)
	}
	if after, err = c.op.Identity(ctx, m.id); err != nil {
		t.Fatal(err)
	}
	sameEKs(t, m.before, after)
	if _, err := c.op.Delete(ctx, m.id); err != nil {
		t.Fatal(err)
	}
}

// testLibvirtMigrateExternal: vtpmd runs swtpm, in its data dir, and the
// guest connects to its socket; two agents share the machine's libvirtd,
// each with its own host name and data dir (so their sockets and state
// differ). The vTPM, running on lv-a, gets its NV index and counter
// through its socket; stopped, it is attached to the guest and moved to
// lv-b, where the guest boots connected to lv-b's swtpm. vTPMs of the two
// other secret securities move too, and are read through lv-b's swtpm.
func testLibvirtMigrateExternal(t *testing.T) {
	swtpmtest.Require(t, "tpm2_nvdefine")
	lv := connectLibvirt(t)
	c := newCluster(t)
	ctx := context.Background()
	flags := []string{"--backend", "libvirt", "--libvirt-mode", "external", "--enable-vtpm"}
	// Each agent has its own socket directory: the default, /run/vtpmd,
	// is one per machine, and a vTPM's sockets are named by its instance.
	sockets := func() string {
		dir, err := os.MkdirTemp("", "vs-") // short: a unix socket's path is bounded
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		return dir
	}
	c.addAgent("lv-a", 4, append(flags, "--socket-dir", sockets())...)
	bSockets := sockets()
	c.addAgent("lv-b", 4, append(flags, "--socket-dir", bSockets)...)
	if _, err := c.op.DrainHost(ctx, "lv-b"); err != nil {
		t.Fatal(err)
	}
	type vtpm struct {
		id            string
		before        api.Identity
		data, counter []byte
	}
	// Made on lv-a (lv-b drained), written to through the running vTPM's
	// socket, stopped.
	onA := func(specs ...string) vtpm {
		m := vtpm{id: uuid.NewString()}
		if _, err := c.create(m.id, append([]string{"hw:tpm_model", "tpm-crb"}, specs...)...); err != nil {
			t.Fatal(err)
		}
		v := c.wait(m.id, "active")
		if v.Host != "lv-a" {
			t.Fatalf("placed on %s", v.Host)
		}
		m.data = bytes.Repeat([]byte(v.Spec.SecretSecurity[:1]), 32)
		m.counter = writeNVCounted(t, v.Sockets.Data, m.data)
		var err error
		if m.before, err = c.op.Identity(ctx, m.id); err != nil {
			t.Fatal(err)
		}
		if _, err := c.op.Stop(ctx, m.id); err != nil {
			t.Fatal(err)
		}
		c.wait(m.id, "stopped")
		return m
	}
	booted := onA() // the default secret security
	var others []vtpm
	for _, ss := range []string{"user", "host", "deployment"} {
		if v, _ := c.op.Get(ctx, booted.id); v.Spec.SecretSecurity != ss {
			others = append(others, onA("hw:tpm_secret_security", ss))
		}
	}
	id, before, data, counter := booted.id, booted.before, booted.data, booted.counter
	gdir := t.TempDir()
	dom := defineGuest(t, lv, id, gdir)
	if _, err := c.op.Attach(ctx, id, dom.Name); err != nil {
		t.Fatal(err)
	}
	if _, err := c.op.UndrainHost(ctx, "lv-b"); err != nil {
		t.Fatal(err)
	}

	moved := migrateTo(t, c, id, "lv-b")
	if moved.Host != "lv-b" || moved.Domain != dom.Name {
		t.Fatalf("after the migration: host %s, domain %q", moved.Host, moved.Domain)
	}
	c.onlyOn(id, "lv-b")
	after, err := c.op.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	sameEKs(t, before, after)
	bootChecked(t, c, id, filepath.Join(gdir, "console.log"), before, data, counter)
	if tpms := guestTPM(t, lv, dom); len(tpms) != 1 || tpms[0].Backend.External == nil ||
		!strings.HasPrefix(tpms[0].Backend.External.Source.UNIX.Path, bSockets+"/") {
		t.Fatalf("the guest's TPM on lv-b: %+v", tpms[0].Backend.External)
	}

	for _, m := range others {
		if got := migrateTo(t, c, m.id, "lv-b"); got.Host != "lv-b" {
			t.Fatalf("%s after the migration: on %s", got.Spec.SecretSecurity, got.Host)
		}
		c.onlyOn(m.id, "lv-b")
		if _, err := c.op.Start(ctx, m.id); err != nil {
			t.Fatal(err)
		}
		v := c.wait(m.id, "active")
		if !strings.HasPrefix(v.Sockets.Data, bSockets+"/") {
			t.Fatalf("%s: running on lv-b with the socket %s", v.Spec.SecretSecurity, v.Sockets.Data)
		}
		if got := readNVData(t, v.Sockets.Data); !bytes.Equal(got, m.data) {
			t.Fatalf("%s: NV index on lv-b = %q, want %q", v.Spec.SecretSecurity, got, m.data)
		}
		if got := readCounter(t, v.Sockets.Data); !bytes.Equal(got, m.counter) {
			t.Fatalf("%s: NV counter on lv-b = %x, want %x", v.Spec.SecretSecurity, got, m.counter)
		}
		after, err := c.op.Identity(ctx, m.id)
		if err != nil {
			t.Fatal(err)
		}
		sameEKs(t, m.before, after)
		t.Logf("secret security %s: moved to lv-b, its NV index and counter read there through its swtpm", v.Spec.SecretSecurity)
	}
}

// TestLibvirtExternalSharedDiscard: two external-mode hosts sharing one
// libvirtd, as testLibvirtMigrateExternal runs them. A running vTPM's cold
// migration switches the record to the target, which starts the guest
// with its own swtpm, while the source removes its copy; the source may
// have read the guest's definition just before the target changed it.
// That moment is set up here: the guest runs on lv-b with lv-b's swtpm,
// its definition (as the source read it) still names lv-a's socket, and
// the migration is at its cleaning step. The source's discard leaves the
// guest running (it runs with lv-b's TPM, as its live definition says);
// the definition loses the stale device, and lv-b's agent puts its own
// back. (Were the guest powered off, lv-b's agent, finding its vTPM
// active, would leave it off: a guest that stopped is not restarted
// behind its owner's back.)
func TestLibvirtExternalSharedDiscard(t *testing.T) {
	lv := connectLibvirt(t)
	c := newCluster(t)
	ctx := context.Background()
	st, err := store.OpenPostgres(ctx, c.dsn, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	flags := []string{"--backend", "libvirt", "--libvirt-mode", "external", "--enable-vtpm"}
	sockets := func() string {
		dir, err := os.MkdirTemp("", "vs-") // short: a unix socket's path is bounded
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		return dir
	}
	c.addAgent("lv-a", 2, append(flags, "--socket-dir", sockets())...)
	c.addAgent("lv-b", 2, append(flags, "--socket-dir", sockets())...)
	if _, err := c.op.DrainHost(ctx, "lv-b"); err != nil {
		t.Fatal(err)
	}
	id := uuid.NewString()
	if _, err := c.create(id, "hw:tpm_model", "tpm-crb"); err != nil {
		t.Fatal(err)
	}
	onA := c.wait(id, "active").Sockets.Ctrl
	if _, err := c.op.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "stopped")
	dom := defineGuest(t, lv, id, t.TempDir())
	if _, err := c.op.Attach(ctx, id, dom.Name); err != nil {
		t.Fatal(err)
	}
	if _, err := c.op.UndrainHost(ctx, "lv-b"); err != nil {
		t.Fatal(err)
	}
	migrateTo(t, c, id, "lv-b")
	if _, err := c.op.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	onB := c.wait(id, "active").Sockets.Ctrl
	if guestState(t, lv, dom) != golibvirt.DomainRunning || onB == onA {
		t.Fatalf("the guest on lv-b: %v, socket %s (lv-a's %s)", guestState(t, lv, dom), onB, onA)
	}

	// The definition as the source read it, and the migration at cleaning;
	// lv-b's agent, which would put its device back at once, is away
	// meanwhile (its swtpm and the guest run on).
	stop(c.agents["lv-b"].cmd, syscall.SIGKILL)
	d := definition(t, lv, dom)
	d.Devices.TPMs[0].Backend.External.Source.UNIX.Path = onA
	xml, err := d.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lv.DomainDefineXML(xml); err != nil {
		t.Fatal(err)
	}
	plantMigration(t, st, store.Migration{InstanceID: id, Source: "lv-a", Target: "lv-b", Step: store.MigrationCleaning, WasRunning: true})
	if v := migrateTo(t, c, id, "lv-b"); v.Host != "lv-b" {
		t.Fatalf("after the cleaning: on %s", v.Host)
	}
	if guestState(t, lv, dom) != golibvirt.DomainRunning {
		t.Fatal("the source's discard stopped the guest running on the target with the target's TPM")
	}
	c.startAgent(c.agents["lv-b"])
	c.eventually("lv-b's agent gives the definition its TPM back", func() error {
		tpms := guestTPM(t, lv, dom)
		if len(tpms) != 1 || tpms[0].Backend.External == nil || tpms[0].Backend.External.Source.UNIX.Path != onB {
			return fmt.Errorf("the guest's TPM devices: %+v", tpms)
		}
		return nil
	})
	if v := c.wait(id, "active"); v.Host != "lv-b" || guestState(t, lv, dom) != golibvirt.DomainRunning {
		t.Fatalf("at the end: on %s, guest %v", v.Host, guestState(t, lv, dom))
	}
}
