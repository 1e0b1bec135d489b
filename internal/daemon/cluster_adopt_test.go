package daemon

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/store"
)

// otherLibvirtd is a second libvirtd on this machine, standing for another
// host's: it runs in a mount namespace of its own, where its state,
// configuration and runtime directories (libvirt's swtpm state directory
// among them) are empty tmpfs, so it starts with no domains, secrets or
// vTPM state, and what it and the agent running beside it keep there is
// theirs alone. Its sockets are in a directory of the test's. It logs the
// guests' output itself rather than through virtlogd (whose socket is in
// the runtime directory). It is stopped when the test ends.
type otherLibvirtd struct {
	socket string
	pid    int // libvirtd's, in its namespace
}

func startOtherLibvirtd(t *testing.T) *otherLibvirtd {
	t.Helper()
	dir, err := os.MkdirTemp("", "lv2-") // short: a unix socket's path is bounded
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	conf := filepath.Join(dir, "libvirtd.conf")
	if err := os.WriteFile(conf, []byte("unix_sock_dir = \""+dir+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	qemuConf, err := os.ReadFile("/etc/libvirt/qemu.conf")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "qemu.conf"), append(qemuConf, "\nstdio_handler = \"file\"\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	script := `for p in /run/libvirt /var/lib/libvirt/qemu /etc/libvirt/qemu /var/cache/libvirt /var/lib/libvirt/swtpm; do
	if [ -d "$p" ]; then mount -t tmpfs tmpfs "$p" || exit 1; fi
done
mount --bind "$3" /etc/libvirt/qemu.conf || exit 1
exec libvirtd -f "$1" -p "$2"`
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", conf, filepath.Join(dir, "libvirtd.pid"), filepath.Join(dir, "qemu.conf"))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("a second libvirtd: %v", err)
	}
	t.Cleanup(func() { stop(cmd, syscall.SIGTERM) })
	socket := filepath.Join(dir, "libvirt-sock")
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		lv := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket)))
		err := lv.ConnectToURI(golibvirt.QEMUSystem)
		if err == nil {
			lv.Disconnect()
			// unshare and sh exec: the process is libvirtd.
			return &otherLibvirtd{socket: socket, pid: cmd.Process.Pid}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the second libvirtd does not answer: %v\n%s", err, out.String())
		}
	}
}

// path is where path in the second libvirtd's namespace is seen from
// this one.
func (l *otherLibvirtd) path(path string) string {
	return filepath.Join("/proc", strconv.Itoa(l.pid), "root", path)
}

// nsenter is the command prefix that runs a program in the second
// libvirtd's mount namespace, as a program beside it on its host.
func (l *otherLibvirtd) nsenter() []string {
	return []string{"nsenter", "--target", strconv.Itoa(l.pid), "--mount", "--"}
}

// clusterKeyring opens the key manager of c's server, as a second process
// would: the embedded one, its secrets sealed in the server's PostgreSQL
// store under the master key in its data dir.
func clusterKeyring(t *testing.T, c *cluster) *embedded.Keyring {
	t.Helper()
	st, err := store.OpenPostgres(context.Background(), c.dsn, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	kr, err := embedded.Open(context.Background(), st, filepath.Join(c.dir, "master.key"))
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

// TestClusterAdopt takes over a vTPM Nova made through the split roles: a
// vtpmd server on PostgreSQL with the embedded key manager, and two
// libvirt agents (emulator mode), enrolled with join tokens; one has
// Nova's guest, the other its own libvirtd without it. The adoption
// reaches both through their watches; the agent with the domain reads the
// secret from the server over the agent protocol (it has no key manager)
// and the vTPM is recorded on its host; the other answers domain_not_found,
// which does not fail the adoption, and named alone, refuses it. Then the
// server starts and stops the guest through its agent, NV data and EK
// intact, and deletes it.
func TestClusterAdopt(t *testing.T) {
	lv := connectLibvirt(t)
	c := newCluster(t)
	ctx := context.Background()
	nova := c.addAgent("hv-nova", 2, "--backend", "libvirt", "--libvirt-mode", "emulator", "--enable-vtpm")
	empty := c.addAgent("hv-empty", 2, "--backend", "libvirt", "--libvirt-mode", "emulator", "--enable-vtpm", "--libvirt-socket", startOtherLibvirtd(t).socket)
	kr := clusterKeyring(t, c)

	id := uuid.NewString()
	passphrase, err := keyring.NewVTPMSecret()
	if err != nil {
		t.Fatal(err)
	}
	sid, err := kr.Create(ctx, "nova-project", keyring.VTPMSecretName(id), passphrase)
	if err != nil {
		t.Fatal(err)
	}
	dom := defineBareGuest(t, lv, id, "instance-"+id[:8], sid)
	novaStart(t, lv, dom, id, sid, passphrase)
	state := filepath.Join("/var/lib/libvirt/swtpm", id, "tpm2")
	data := []byte("NV data the guest wrote under Nova")
	onState(t, state, passphrase, func(tpm transport.TPM) { nvWrite(t, tpm, data) })
	ekDER := rsaEK(t, state, passphrase)

	_, err = c.op.Adopt(ctx, id, api.AdoptRequest{Domain: dom.Name, Host: empty.name})
	if e := (*client.Error)(nil); !errors.As(err, &e) || e.Status != 404 || e.Code != api.CodeDomainNotFound {
		t.Fatalf("adopting from the host without the domain: %v, want 404 %s", err, api.CodeDomainNotFound)
	}
	if _, err := c.op.Get(ctx, id); !client.IsNotFound(err) {
		t.Fatalf("the refused adoption left a record: %v", err)
	}

	v, err := c.op.Adopt(ctx, id, api.AdoptRequest{Domain: dom.Name})
	if err != nil {
		t.Fatal(err)
	}
	if v.Host != nova.name || v.Project != "nova-project" || v.SecretRef != sid || v.Domain != dom.Name || v.Spec.SecretSecurity != "user" {
		t.Fatalf("adopted: %+v", v)
	}
	c.wait(id, "stopped")
	identity, err := c.op.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := pem.Decode([]byte(identity.EKs[0].PublicKeyPEM)); b == nil || !bytes.Equal(b.Bytes, ekDER) {
		t.Fatal("the server recorded another EK than the one the TPM holds")
	}

	if _, err := c.op.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "active")
	if guestState(t, lv, dom) != golibvirt.DomainRunning {
		t.Fatal("the adopted guest does not run after start")
	}
	if _, err := c.op.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	c.wait(id, "stopped")
	waitNoProcesses(t, filepath.Dir(state))
	onState(t, state, passphrase, func(tpm transport.TPM) {
		if got := nvRead(t, tpm, userIndex); !bytes.Equal(got, data) {
			t.Fatalf("NV data after vtpmd ran the guest: %q", got)
		}
	})
	if !bytes.Equal(rsaEK(t, state, passphrase), ekDER) {
		t.Fatal("the EK changed")
	}

	if _, err := c.op.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	c.eventually("the adopted vTPM is gone", func() error {
		if _, err := c.op.Get(ctx, id); !client.IsNotFound(err) {
			return errors.New("it is still there")
		}
		return nil
	})
	if _, err := os.Stat(filepath.Dir(state)); !os.IsNotExist(err) {
		t.Fatalf("state %s remains: %v", state, err)
	}
	if _, err := kr.Get(ctx, sid); !errors.Is(err, keyring.ErrNotFound) {
		t.Fatalf("the key-manager secret after delete: %v", err)
	}
}
