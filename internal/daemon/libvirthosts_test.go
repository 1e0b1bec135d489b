package daemon

import (
	"bufio"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"github.com/google/uuid"
	"golang.org/x/sys/unix"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/internal/backend/libvirt"
	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// libvirtHost is one of the two libvirt hosts scripts/libvirt-hosts.sh
// runs on this machine, each in its own namespaces.
type libvirtHost struct {
	root string // where scripts/libvirt-hosts.sh keeps the hosts
	name string // its hostname
	dir  string // its directories: run/ is its /run/libvirt, lib/ its /var/lib/libvirt
	uri  string // how the other host reaches it (peer-to-peer migration)
	lv   *golibvirt.Libvirt
}

// socket is the host's libvirtd socket, as seen from outside its
// namespaces.
func (h libvirtHost) socket() string { return filepath.Join(h.dir, "run", "libvirt-sock") }

// enter is the command line prefix that runs a program on the host: in its
// mount, UTS and network namespaces (its /var/lib/libvirt, its libvirtd's
// socket at the default place, its hostname, its network, where its
// guests' QEMU runs: the kernel tells a unix socket's connections apart by
// the client's network namespace).
func (h libvirtHost) enter() []string {
	return []string{"nsenter", "--mount=" + filepath.Join(h.root, h.name+".mnt"), "--uts=" + filepath.Join(h.root, h.name+".uts"),
		"--net=" + h.netns(), "--"}
}

func (h libvirtHost) netns() string { return "/run/netns/" + h.name }

// forward makes the TCP address addr of this machine's network namespace
// (a loopback one) reachable at the same address inside the host's, as a
// management network would: a listener in the host's namespace whose
// connections are relayed here. It stops when the test ends.
func (h libvirtHost) forward(t testing.TB, addr string) {
	t.Helper()
	l, err := listenIn(h.netns(), addr)
	if err != nil {
		t.Fatalf("listening on %s in %s: %v", addr, h.name, err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer in.Close()
				out, err := net.Dial("tcp", addr)
				if err != nil {
					return
				}
				defer out.Close()
				go func() { io.Copy(out, in); out.(*net.TCPConn).CloseWrite() }()
				io.Copy(in, out)
			}()
		}
	}()
}

// listenIn listens on addr in the network namespace at path, from a
// thread that enters it and then exits (a goroutine that ends locked to
// its thread takes the thread with it): no other goroutine runs there.
func listenIn(path, addr string) (net.Listener, error) {
	type listened struct {
		l   net.Listener
		err error
	}
	done := make(chan listened, 1)
	go func() {
		runtime.LockOSThread()
		ns, err := os.Open(path)
		if err != nil {
			done <- listened{err: err}
			return
		}
		defer ns.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- listened{err: err}
			return
		}
		l, err := net.Listen("tcp", addr)
		done <- listened{l, err}
	}()
	r := <-done
	return r.l, r.err
}

// twoLibvirtHosts connects to the two libvirt hosts, failing under CI=true
// and skipping otherwise when they are not up.
func twoLibvirtHosts(t testing.TB) [2]libvirtHost {
	t.Helper()
	swtpmtest.Require(t)
	root := os.Getenv("VTPMD_LIBVIRT_HOSTS")
	if root == "" {
		root = "/run/vtpmd-hosts"
	}
	hosts := [2]libvirtHost{
		{root: root, name: "vtpm-h1", dir: filepath.Join(root, "vtpm-h1"), uri: "qemu+tcp://10.231.0.1/system"},
		{root: root, name: "vtpm-h2", dir: filepath.Join(root, "vtpm-h2"), uri: "qemu+tcp://10.231.0.2/system"},
	}
	for i, h := range hosts {
		if _, err := os.Stat(h.socket()); err != nil {
			citest.Missing(t, "the two libvirt hosts are not up (scripts/libvirt-hosts.sh up brings them up)")
		}
		lv := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(h.socket())))
		if err := lv.ConnectToURI(golibvirt.QEMUSystem); err != nil {
			t.Fatalf("connecting to the libvirtd of %s: %v", h.name, err)
		}
		t.Cleanup(func() { lv.Disconnect() })
		hosts[i].lv = lv
	}
	return hosts
}

// migrationGuest is the test guest (q35, OVMF, TCG, no disk) booting
// migrateinit, which keeps running and reports its TPM every second on its
// serial console, dir/console.log (appended to, so the sources' and
// destinations' QEMU write one log); o adds to it (o.init is
// migrateinit). tpm is its TPM device, or nil. It is destroyed and
// undefined on both hosts, its TPM state removed, when the test ends.
func migrationGuest(t testing.TB, hosts [2]libvirtHost, id, dir string, o guestOptions, tpm *libvirtxml.DomainTPM) libvirtxml.Domain {
	t.Helper()
	o.init = migrateInit
	d := guestDomain(t, id, dir, o)
	d.Devices.Serials[0].Source.File.Append = "on"
	if tpm != nil {
		d.Devices.TPMs = []libvirtxml.DomainTPM{*tpm}
	}
	t.Cleanup(func() {
		for _, h := range hosts {
			if dom, err := h.lv.DomainLookupByName(d.Name); err == nil {
				h.lv.DomainDestroy(dom)
				h.lv.DomainUndefineFlags(dom, golibvirt.DomainUndefineKeepNvram)
			}
			os.RemoveAll(filepath.Join(h.dir, "lib", "swtpm", id))
		}
	})
	return d
}

// migrateInit is the /init of the live migration guests.
const migrateInit = "github.com/vtpmd/vtpmd/internal/guest/migrateinit"

// consoleReport is what migrateinit printed on a guest's console.
type consoleReport struct {
	boots      []string // the nonce of each boot
	nv         string   // what it wrote to its NV index at its last boot
	ticks      []tick
	registered int // how many times its guest agent registered
	verdicts   []verdict
}

type tick struct {
	n        int
	pcrs, nv string
}

// verdict is the guest agent's verdict on the quote it made after tick n.
type verdict struct {
	n               int
	verdict, reason string
}

func readConsole(t testing.TB, console string) consoleReport {
	t.Helper()
	f, err := os.Open(console)
	if err != nil {
		return consoleReport{}
	}
	defer f.Close()
	var r consoleReport
	s := bufio.NewScanner(f)
	for s.Scan() {
		line := strings.TrimSpace(s.Text())
		f := strings.Fields(line)
		switch {
		case len(f) == 3 && f[0] == "MIGRATEINIT" && f[1] == "BOOT":
			r.boots = append(r.boots, f[2])
		case len(f) == 4 && strings.HasPrefix(line, "MIGRATEINIT NV WROTE "):
			r.nv = f[3]
		case len(f) == 7 && f[1] == "TICK" && f[3] == "PCRS" && f[5] == "NV":
			n, err := strconv.Atoi(f[2])
			if err == nil {
				r.ticks = append(r.ticks, tick{n: n, pcrs: f[4], nv: f[6]})
			}
		case line == "MIGRATEINIT REGISTERED":
			r.registered++
		case len(f) >= 4 && f[0] == "MIGRATEINIT" && f[1] == "VERDICT":
			n, err := strconv.Atoi(f[2])
			if err == nil {
				r.verdicts = append(r.verdicts, verdict{n: n, verdict: f[3], reason: strings.Join(f[4:], " ")})
			}
		}
	}
	return r
}

// waitTick waits until the guest has reported a tick after tick n and
// returns its report.
func waitTick(t testing.TB, console string, after int) consoleReport {
	t.Helper()
	return waitReport(t, console, fmt.Sprintf("a tick after %d", after), func(r consoleReport) bool {
		return len(r.ticks) > 0 && r.ticks[len(r.ticks)-1].n > after
	})
}

// waitReport waits until the guest's console report is what ok wants
// (what describes it) and returns it.
func waitReport(t testing.TB, console, what string, ok func(consoleReport) bool) consoleReport {
	t.Helper()
	deadline := time.Now().Add(4 * time.Minute)
	for {
		r := readConsole(t, console)
		if ok(r) {
			return r
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(console)
			t.Fatalf("the guest reported no %s; console:\n%s", what, b)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// migrateLive live-migrates the running domain name from one host to the
// other, peer-to-peer, its definition with it, as Nova does.
func migrateLive(t testing.TB, from, to libvirtHost, name string) {
	t.Helper()
	dom, err := from.lv.DomainLookupByName(name)
	if err != nil {
		t.Fatal(err)
	}
	flags := golibvirt.MigrateLive | golibvirt.MigratePeer2peer | golibvirt.MigratePersistDest | golibvirt.MigrateUndefineSource
	if _, err := from.lv.DomainMigratePerform3Params(dom, golibvirt.OptString{to.uri}, nil, nil, flags); err != nil {
		t.Fatalf("migrating %s from %s to %s: %v", name, from.name, to.name, err)
	}
}

// checkRunsOn fails unless domain name runs on host h and is not defined
// on the other host.
func checkRunsOn(t testing.TB, h, other libvirtHost, name string) {
	t.Helper()
	checkRunning(t, h, name)
	if _, err := other.lv.DomainLookupByName(name); !golibvirt.IsNotFound(err) {
		t.Fatalf("%s is still on %s after migrating away (%v)", name, other.name, err)
	}
}

// checkRunning fails unless domain name runs on host h.
func checkRunning(t testing.TB, h libvirtHost, name string) {
	t.Helper()
	dom, err := h.lv.DomainLookupByName(name)
	if err != nil {
		t.Fatalf("%s on %s: %v", name, h.name, err)
	}
	if st, _, err := h.lv.DomainGetState(dom, 0); err != nil || golibvirt.DomainState(st) != golibvirt.DomainRunning {
		t.Fatalf("%s on %s: state %d, %v; want running", name, h.name, st, err)
	}
}

// TestLibvirtHostsLiveMigration proves the two libvirt hosts on this
// machine: a guest without a TPM, then one with an emulator-mode TPM
// (encrypted state, the libvirt secret on both hosts), is live-migrated
// peer-to-peer to the other host and back, and keeps running (one boot,
// its ticks go on), with, for the TPM, the same PCRs and the NV value it
// wrote, read from the TPM that now runs on the other host.
func TestLibvirtHostsLiveMigration(t *testing.T) {
	hosts := twoLibvirtHosts(t)
	t.Run("plain", func(t *testing.T) { testHostsLiveMigration(t, hosts, false) })
	t.Run("emulator-tpm", func(t *testing.T) { testHostsLiveMigration(t, hosts, true) })
}

func testHostsLiveMigration(t *testing.T, hosts [2]libvirtHost, withTPM bool) {
	id, dir := uuid.NewString(), t.TempDir()
	var tpm *libvirtxml.DomainTPM
	if withTPM {
		secretID := uuid.NewString()
		key := make([]byte, 32)
		rand.Read(key)
		xml, err := libvirt.SecretXML(secretID, false, true, id)
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range hosts {
			s, err := h.lv.SecretDefineXML(xml, 0)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { h.lv.SecretUndefine(s) })
			if err := h.lv.SecretSetValue(s, key, 0); err != nil {
				t.Fatal(err)
			}
		}
		tpm = &libvirtxml.DomainTPM{Model: "tpm-crb", Backend: &libvirtxml.DomainTPMBackend{Emulator: &libvirtxml.DomainTPMBackendEmulator{
			Version: "2.0", Encryption: &libvirtxml.DomainTPMBackendEncryption{Secret: secretID}}}}
	}
	d := migrationGuest(t, hosts, id, dir, guestOptions{}, tpm)
	xml, err := d.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	h1, h2 := hosts[0], hosts[1]
	dom, err := h1.lv.DomainDefineXML(xml)
	if err != nil {
		t.Fatal(err)
	}
	if err := h1.lv.DomainCreate(dom); err != nil {
		t.Fatal(err)
	}
	console := filepath.Join(dir, "console.log")
	before := waitTick(t, console, 0)
	first := before.ticks[len(before.ticks)-1]
	if withTPM && (before.nv == "" || first.nv != before.nv || strings.HasPrefix(first.pcrs, "error") || first.pcrs == "none") {
		t.Fatalf("the guest's TPM before migrating: wrote NV %q, tick %+v", before.nv, first)
	}
	for _, leg := range [][2]libvirtHost{{h1, h2}, {h2, h1}} {
		from, to := leg[0], leg[1]
		last := readConsole(t, console).ticks
		migrateLive(t, from, to, d.Name)
		checkRunsOn(t, to, from, d.Name)
		after := waitTick(t, console, last[len(last)-1].n)
		if len(after.boots) != 1 {
			t.Fatalf("the guest booted %d times (%v); want once: it must keep running across the migration", len(after.boots), after.boots)
		}
		got := after.ticks[len(after.ticks)-1]
		if got.pcrs != first.pcrs || got.nv != first.nv {
			t.Fatalf("on %s the guest reports PCRs %s, NV %s; before migrating, %s and %s", to.name, got.pcrs, got.nv, first.pcrs, first.nv)
		}
		if withTPM {
			// The state moved with the guest: libvirt keeps it per host.
			if _, err := os.Stat(filepath.Join(to.dir, "lib", "swtpm", id)); err != nil {
				t.Fatalf("no TPM state on %s: %v", to.name, err)
			}
			if _, err := os.Stat(filepath.Join(from.dir, "lib", "swtpm", id)); !os.IsNotExist(err) {
				t.Fatalf("TPM state left on %s after migrating away (%v)", from.name, err)
			}
		}
	}
}
