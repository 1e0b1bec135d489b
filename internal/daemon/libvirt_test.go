package daemon

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"maps"
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
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/uuid"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/backend/libvirt"
	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/guest"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// connectLibvirt connects to the system libvirtd, failing under CI=true
// and skipping otherwise when none runs.
func connectLibvirt(t testing.TB) *golibvirt.Libvirt {
	t.Helper()
	swtpmtest.Require(t)
	if _, err := os.Stat(libvirt.DefaultSocket); err != nil {
		citest.Missing(t, "libvirtd is not running (scripts/libvirtd-up.sh starts it)")
	}
	lv := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(libvirt.DefaultSocket)))
	if err := lv.ConnectToURI(golibvirt.QEMUSystem); err != nil {
		t.Fatalf("connecting to libvirtd: %v", err)
	}
	t.Cleanup(func() { lv.Disconnect() })
	return lv
}

// guestImage is the Debian kernel and an initramfs whose /init is the Go
// main package o.init (with the e1000 driver at /lib/modules/e1000.ko, and
// o.files), cached.
func guestImage(t testing.TB, o guestOptions) (kernel, initrd string) {
	t.Helper()
	cache, err := guest.CacheDir()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	k, err := guest.DebianKernel(ctx, cache)
	if err != nil {
		t.Fatalf("getting the guest kernel: %v", err)
	}
	// The attestation guest's /init is also its /bin/sh (the key broker's
	// revocation action: see attestinit).
	var initAlso []string
	if o.init == attestInit {
		initAlso = []string{"bin/sh"}
	}
	files := map[string]string{"lib/modules/e1000.ko": k.E1000}
	maps.Copy(files, o.files)
	initrd, err = guest.Initramfs(ctx, cache, o.init, files, initAlso...)
	if err != nil {
		t.Fatal(err)
	}
	return k.Vmlinuz, initrd
}

// The guests' /init programs.
const (
	pcrInit    = "github.com/vtpmd/vtpmd/internal/guest/testinit"   // prints PCRs and the event log
	attestInit = "github.com/vtpmd/vtpmd/internal/guest/attestinit" // runs the guest agent once
)

// waitConsole waits until the guest's console holds marker, and returns it.
func waitConsole(t testing.TB, console, marker string) string {
	t.Helper()
	deadline := time.Now().Add(4 * time.Minute) // TCG boots in ≈16 s; CI machines are slower
	for {
		b, _ := os.ReadFile(console)
		if bytes.Contains(b, []byte(marker)) {
			return string(b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest did not print %q; console:\n%s", marker, b)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// bootPCRs waits for the test init's report on the guest's console and
// returns the PCR values (and the event log, as "eventlog") it printed,
// and its TPM lines (its printTPM) by what precedes their "=": "TPM EK
// sha256", "TPM NV 0x1500016", ...
func bootPCRs(t *testing.T, console string) map[string]string {
	t.Helper()
	pcrs := map[string]string{}
	for _, line := range strings.Split(waitConsole(t, console, "VTPM-TESTINIT DONE"), "\n") {
		line = strings.TrimSpace(line)
		if k, v, ok := strings.Cut(line, "="); ok && strings.HasPrefix(line, "TPM ") {
			pcrs[k] = v
		}
		if k, v, ok := strings.Cut(strings.TrimPrefix(line, "PCR "), "="); ok && strings.HasPrefix(line, "PCR ") {
			pcrs[k] = v
		}
		if l, ok := strings.CutPrefix(line, "EVENTLOG "); ok {
			pcrs["eventlog"] = l
		}
	}
	return pcrs
}

// guestOptions shape a test guest.
type guestOptions struct {
	init    string // Go main package for /init
	cmdline string // appended to the kernel command line
	network bool   // QEMU user networking (e1000): the host is 10.0.2.2
	// files are put in the initramfs: its path → a file on this machine.
	files map[string]string
}

// guestDomainType is the libvirt domain type of the test guests: "qemu",
// so TCG. Not KVM, even where /dev/kvm exists: a device node is not proof
// that KVM works (where it is nested or emulated, a KVM guest may stop at
// once with "KVM internal error … emulation failure", or hang), and TCG
// behaves the same on every machine. guestAccelName is the accelerator
// that means, as QEMU names it; guestAccel checks it in QEMU.
const (
	guestDomainType = "qemu"
	guestAccelName  = "tcg"
)

// guestAccel asks the QEMU of the running guest dom which accelerator it
// runs under: "kvm" or "tcg".
func guestAccel(t testing.TB, lv *golibvirt.Libvirt, dom golibvirt.Domain) string {
	t.Helper()
	out, err := lv.QEMUDomainMonitorCommand(dom, `{"execute":"query-kvm"}`, 0)
	if err != nil {
		t.Fatalf("asking QEMU for its accelerator: %v", err)
	}
	var r struct {
		Return *struct{ Enabled bool } `json:"return"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil || r.Return == nil {
		t.Fatalf("QEMU's answer to query-kvm: %s (%v)", out, err)
	}
	if r.Return.Enabled {
		return "kvm"
	}
	return "tcg"
}

// defineGuest defines a small UEFI guest (q35, OVMF, 256 MiB, TCG, no disk)
// whose UUID is id, booting the Debian kernel and the test init, with its
// serial console in dir/console.log. It is undefined, with its TPM state
// and NVRAM, when the test ends.
func defineGuest(t testing.TB, lv *golibvirt.Libvirt, id, dir string) golibvirt.Domain {
	t.Helper()
	return defineGuestWith(t, lv, id, dir, guestOptions{init: pcrInit})
}

func defineGuestWith(t testing.TB, lv *golibvirt.Libvirt, id, dir string, o guestOptions) golibvirt.Domain {
	t.Helper()
	d := guestDomain(t, id, dir, o)
	xml, err := d.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	dom, err := lv.DomainDefineXML(xml)
	if err != nil {
		t.Fatalf("defining the guest: %v", err)
	}
	t.Cleanup(func() {
		lv.DomainDestroy(dom)
		lv.DomainUndefineFlags(dom, golibvirt.DomainUndefineNvram)
	})
	return dom
}

// guestDomain is the test guest id as a libvirt domain, not yet defined:
// q35, OVMF (its variables in dir), the test kernel with o's /init, its
// serial console in dir/console.log.
func guestDomain(t testing.TB, id, dir string, o guestOptions) libvirtxml.Domain {
	t.Helper()
	kernel, initrd := guestImage(t, o)
	// QEMU may run as another user (libvirt-qemu): it must reach the
	// guest's files, as it would under /var/lib/libvirt.
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	nvram := filepath.Join(dir, "OVMF_VARS.fd")
	vars, err := os.ReadFile("/usr/share/OVMF/OVMF_VARS_4M.fd")
	if err != nil {
		t.Fatalf("OVMF is not installed: %v", err)
	}
	if err := os.WriteFile(nvram, vars, 0o600); err != nil {
		t.Fatal(err)
	}
	port := uint(0)
	d := libvirtxml.Domain{
		Type: guestDomainType, Name: "vtpmd-test-" + id[:8], UUID: id,
		Memory: &libvirtxml.DomainMemory{Value: 256, Unit: "MiB"},
		VCPU:   &libvirtxml.DomainVCPU{Value: 1},
		OS: &libvirtxml.DomainOS{
			Type:    &libvirtxml.DomainOSType{Arch: "x86_64", Machine: "q35", Type: "hvm"},
			Loader:  &libvirtxml.DomainLoader{Path: "/usr/share/OVMF/OVMF_CODE_4M.fd", Readonly: "yes", Type: "pflash"},
			NVRam:   &libvirtxml.DomainNVRam{NVRam: nvram},
			Kernel:  kernel,
			Initrd:  initrd,
			Cmdline: strings.TrimSpace("console=ttyS0 panic=-1 " + o.cmdline),
		},
		Features:   &libvirtxml.DomainFeatureList{ACPI: &libvirtxml.DomainFeature{}},
		OnPoweroff: "destroy", OnReboot: "destroy", OnCrash: "destroy",
		Devices: &libvirtxml.DomainDeviceList{
			Emulator: "/usr/bin/qemu-system-x86_64",
			Serials: []libvirtxml.DomainSerial{{
				Source: &libvirtxml.DomainChardevSource{File: &libvirtxml.DomainChardevSourceFile{Path: filepath.Join(dir, "console.log")}},
				Target: &libvirtxml.DomainSerialTarget{Port: &port},
			}},
		},
	}
	if o.network {
		d.Devices.Interfaces = []libvirtxml.DomainInterface{{
			Source: &libvirtxml.DomainInterfaceSource{User: &libvirtxml.DomainInterfaceSourceUser{}},
			Model:  &libvirtxml.DomainInterfaceModel{Type: "e1000"},
		}}
	}
	return d
}

func guestState(t *testing.T, lv *golibvirt.Libvirt, dom golibvirt.Domain) golibvirt.DomainState {
	t.Helper()
	st, _, err := lv.DomainGetState(dom, 0)
	if err != nil {
		t.Fatal(err)
	}
	return golibvirt.DomainState(st)
}

func guestTPM(t *testing.T, lv *golibvirt.Libvirt, dom golibvirt.Domain) []libvirtxml.DomainTPM {
	t.Helper()
	return definition(t, lv, dom).Devices.TPMs
}

// definition is dom's persistent definition.
func definition(t *testing.T, lv *golibvirt.Libvirt, dom golibvirt.Domain) *libvirtxml.Domain {
	t.Helper()
	xml, err := lv.DomainGetXMLDesc(dom, golibvirt.DomainXMLInactive)
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(xml); err != nil {
		t.Fatal(err)
	}
	return &d
}

// rsaEK starts a swtpm of our own on a stopped vTPM's state and reads the
// RSA EK the TPM holds: the TPM libvirt ran must be the one vtpmd made.
func rsaEK(t *testing.T, dir string, secret []byte) []byte {
	t.Helper()
	i := swtpm.Instance{Dir: dir, Version: spec.V20, Secret: secret}
	p, err := swtpm.Start(context.Background(), i, nil)
	if err != nil {
		t.Fatalf("opening the state in %s: %v", dir, err)
	}
	defer p.Stop(context.Background())
	var der []byte
	withTPM(t, i.DataSocket(), func(tpm transport.TPM) {
		rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(swtpm.RSAEKHandle)}.Execute(tpm)
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := rp.OutPublic.Contents()
		key, err := tpm2.Pub(*pub)
		if err != nil {
			t.Fatal(err)
		}
		der, _ = x509.MarshalPKIXPublicKey(key)
	})
	return der
}

// startLibvirtDaemon runs an all-in-one daemon with the libvirt backend in
// mode, vTPM enabled, as host lv-host.
func startLibvirtDaemon(t testing.TB, dir, mode string) *daemonUnderTest {
	t.Helper()
	if mode == "external" {
		// Its swtpm processes outlive vtpmd by design; not the test. (This
		// cleanup runs after the daemon's, which is registered later.)
		t.Cleanup(func() {
			for _, p := range swtpmtest.Processes(dir) {
				pid, _, _ := strings.Cut(p, ":")
				if n, err := strconv.Atoi(pid); err == nil {
					syscall.Kill(n, syscall.SIGKILL)
				}
			}
		})
	}
	return startConfigured(t, Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "lv-host", Backend: "libvirt",
		Libvirt: LibvirtConfig{Mode: mode, EnableVTPM: true}})
}

// TestLibvirt runs the libvirt backend against the real libvirtd, in both
// modes: attach a vTPM to a UEFI guest, run it, stop and start it (same
// TPM), detach and delete it.
func TestLibvirt(t *testing.T) {
	for _, c := range []struct{ mode, secretSecurity string }{
		{"emulator", "user"}, {"emulator", "host"}, {"external", "user"},
	} {
		t.Run(c.mode+"/"+c.secretSecurity, func(t *testing.T) { testLibvirt(t, c.mode, c.secretSecurity) })
	}
}

func testLibvirt(t *testing.T, mode, secretSecurity string) {
	lv := connectLibvirt(t)
	dir := t.TempDir()
	u := startLibvirtDaemon(t, dir, mode)
	d, ctx := u.d, context.Background()

	hosts, err := u.c.Hosts(ctx)
	if err != nil || len(hosts.Items) != 1 || hosts.Items[0].Backend != "libvirt" ||
		!strings.Contains(strings.Join(hosts.Items[0].Traits, ","), "COMPUTE_SECURITY_TPM_CRB") {
		t.Fatalf("hosts: %+v %v", hosts, err)
	}

	id := uuid.NewString()
	dom := defineGuest(t, lv, id, dir)
	_, err = u.c.Create(ctx, api.CreateVTPMRequest{InstanceID: id, Project: "p1", ResolveRequest: api.ResolveRequest{
		FlavorSpecs: map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb", "hw:tpm_secret_security": secretSecurity}}})
	if err != nil {
		t.Fatal(err)
	}
	v := u.wait(t, id, "active")
	if _, err := u.c.Attach(ctx, id, dom.Name); err != nil {
		t.Fatal(err)
	}
	v = u.wait(t, id, "active")
	if v.Domain != dom.Name || guestState(t, lv, dom) != golibvirt.DomainRunning {
		t.Fatalf("after attach: domain %q, guest state %v", v.Domain, guestState(t, lv, dom))
	}
	tpms := guestTPM(t, lv, dom)
	if len(tpms) != 1 || tpms[0].Model != "tpm-crb" {
		t.Fatalf("guest TPM devices: %+v", tpms)
	}
	procs := swtpmtest.Processes("/var/lib/libvirt/swtpm/" + id)
	if mode == "external" {
		procs = swtpmtest.Processes(d.Swtpm().Dir(id))
	}

	// The swtpm serving the guest encrypts its state with the vTPM secret.
	kr := openKeyring(t, dir)
	secret, err := kr.Get(ctx, v.SecretRef)
	if err != nil {
		t.Fatal(err)
	}
	// QEMU and libvirt's swtpm run unprivileged, as libvirt-qemu and tss
	// (Debian's defaults, set by scripts/libvirtd-up.sh), so the vTPM must
	// be reachable by those users alone.
	pid, err := os.ReadFile("/var/run/libvirt/qemu/" + dom.Name + ".pid")
	if err != nil {
		t.Fatal(err)
	}
	if u := processUser(t, string(pid)); u != "libvirt-qemu" {
		t.Fatalf("QEMU runs as %s, not libvirt-qemu: run scripts/libvirtd-up.sh", u)
	}
	state := filepath.Join("/var/lib/libvirt/swtpm", id, "tpm2")
	switch mode {
	case "emulator":
		if len(procs) != 1 || !strings.Contains(procs[0], "pwdfd=") {
			t.Fatalf("libvirt's swtpm for %s: %v", state, procs)
		}
		if pid, _, _ := strings.Cut(procs[0], ":"); processUser(t, pid) != "tss" {
			t.Fatalf("libvirt's swtpm runs as %s, not tss", processUser(t, pid))
		}
		if e := tpms[0].Backend.Emulator; e == nil || e.Version != "2.0" || e.Encryption == nil || e.Encryption.Secret != v.SecretRef {
			t.Fatalf("emulator backend: %+v", tpms[0].Backend)
		}
		// Secret security user: libvirt's copy of the secret is gone once
		// the guest runs. host: it stays, persistent and readable, so that
		// libvirt can start the guest on its own.
		s, err := lv.SecretLookupByUUID(golibvirt.UUID(uuid.MustParse(v.SecretRef)))
		switch {
		case secretSecurity == "user" && err == nil:
			t.Fatal("the ephemeral libvirt secret outlived the guest's start")
		case secretSecurity == "host" && err != nil:
			t.Fatalf("the host-mode libvirt secret is gone: %v", err)
		case secretSecurity == "host":
			if value, err := lv.SecretGetValue(s, 0); err != nil || !bytes.Equal(value, secret.Payload) {
				t.Fatalf("host-mode libvirt secret value: %v", err)
			}
		}
	case "external":
		state = d.Swtpm().Dir(id)
		if x := tpms[0].Backend.External; x == nil || x.Source.UNIX.Path != v.Sockets.Ctrl {
			t.Fatalf("external backend: %+v", tpms[0].Backend)
		}
		if d.Swtpm().Running(id) == 0 {
			t.Fatal("vtpmd's swtpm is not running")
		}
		// QEMU's group, and only it, may connect to vtpmd's swtpm, through
		// a directory it cannot list.
		qemu, err := user.LookupGroup("libvirt-qemu")
		if err != nil {
			t.Fatal(err)
		}
		for path, want := range map[string]os.FileMode{v.Sockets.Ctrl: fs.ModeSocket | 0o660, v.Sockets.Data: fs.ModeSocket | 0o660, filepath.Dir(v.Sockets.Ctrl): fs.ModeDir | 0o710} {
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if gid := fi.Sys().(*syscall.Stat_t).Gid; fi.Mode() != want || strconv.Itoa(int(gid)) != qemu.Gid {
				t.Errorf("%s: mode %v group %d, want %v group %s", path, fi.Mode(), gid, want, qemu.Gid)
			}
		}
	}

	// The firmware measured the boot into this vTPM.
	pcrs := bootPCRs(t, filepath.Join(dir, "console.log"))
	if pcr0 := pcrs["sha256:0"]; len(pcr0) != 64 || strings.Trim(pcr0, "0") == "" {
		t.Fatalf("guest PCR 0 = %q (all PCRs: %v)", pcr0, pcrs)
	}
	// The firmware's event log, read in the guest, replays to those PCRs.
	log, err := base64.StdEncoding.DecodeString(pcrs["eventlog"])
	if err != nil {
		t.Fatalf("event log from the guest: %v", err)
	}
	events, err := attest.ParseEventLog(log)
	if err != nil {
		t.Fatal(err)
	}
	replayed := attest.Replay(events)
	for i := range 8 {
		if got := hex.EncodeToString(replayed[i]); got != pcrs[fmt.Sprintf("sha256:%d", i)] {
			t.Fatalf("PCR %d: the event log (%d events) replays to %s, the TPM says %s", i, len(events), got, pcrs[fmt.Sprintf("sha256:%d", i)])
		}
	}
	if out := os.Getenv("VTPMD_SAVE_EVENTLOG"); out != "" {
		os.WriteFile(out, log, 0o644)
	}

	identity, err := u.c.Identity(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	certified, _ := pem.Decode([]byte(identity.EKs[0].PublicKeyPEM))

	// Stop: guest off, state kept; it is the TPM vtpmd made. Start: back.
	if _, err := u.c.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "stopped")
	if guestState(t, lv, dom) != golibvirt.DomainShutoff {
		t.Fatal("guest still runs after stop")
	}
	waitNoProcesses(t, filepath.Dir(state))
	if got := rsaEK(t, state, secret.Payload); !bytes.Equal(got, certified.Bytes) {
		t.Fatal("the TPM state after the guest ran holds another EK than the one vtpmd certified")
	}
	if _, err := u.c.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "active")
	if guestState(t, lv, dom) != golibvirt.DomainRunning {
		t.Fatal("guest does not run after start")
	}

	// Delete: the guest loses its TPM (and nothing else), secret and state go.
	if _, err := u.c.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.waitGone(t, id)
	if tpms := guestTPM(t, lv, dom); len(tpms) != 0 {
		t.Fatalf("guest still has TPM devices: %+v", tpms)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Fatalf("state %s remains: %v", state, err)
	}
	if _, err := lv.SecretLookupByUUID(golibvirt.UUID(uuid.MustParse(v.SecretRef))); err == nil {
		t.Fatal("libvirt secret remains")
	}
	// Nothing of this vTPM is left for drift to find (the host's libvirt is
	// shared with other tests, so only this vTPM's objects count).
	drift, err := u.c.Drift(ctx, "lv-host", false)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range drift.Findings {
		if f.InstanceID == id || strings.Contains(f.Object, id) || f.Object == v.SecretRef {
			t.Fatalf("drift after delete: %+v", f)
		}
	}
}

// waitNoProcesses waits for the swtpm serving under dir to exit after its guest.
func waitNoProcesses(t *testing.T, dir string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); len(swtpmtest.Processes(dir)) > 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("swtpm still serves %s", dir)
		}
	}
}

// TestLibvirtDisabled: with enable-vtpm off (the default) a libvirt host
// offers no TPM traits, so creates find no host.
func TestLibvirtDisabled(t *testing.T) {
	connectLibvirt(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d, err := StartAllInOne(ctx, Config{DataDir: t.TempDir(), Listen: "127.0.0.1:0", HostName: "lv-off", Backend: "libvirt"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown(context.Background())
	c := client.New(d.OperatorURL, "")
	hosts, err := c.Hosts(ctx)
	if err != nil || len(hosts.Items) != 1 || len(hosts.Items[0].Traits) != 0 {
		t.Fatalf("hosts: %+v %v", hosts, err)
	}
	_, err = c.Create(ctx, api.CreateVTPMRequest{InstanceID: uuid.NewString(), Project: "p1",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}})
	var e *client.Error
	if !errors.As(err, &e) || e.Status != 409 || e.Code != api.CodeNoValidHost {
		t.Fatalf("create on a host with vTPM disabled: %v", err)
	}
}

// TestLibvirtExternalRestart: in external mode a running guest holds its
// vTPM's swtpm, and QEMU never reconnects. vtpmd restarting must leave that
// swtpm running and take it back; a swtpm that does die under the guest
// (killed here) must show as an error rather than as active, and a stop
// and start must give the guest its TPM back.
func TestLibvirtExternalRestart(t *testing.T) {
	lv := connectLibvirt(t)
	dir := t.TempDir()
	u := startLibvirtDaemon(t, dir, "external")
	ctx := context.Background()
	id := uuid.NewString()
	// The guest's files are outside the data dir, which vtpmd makes
	// private again when it restarts.
	dom := defineGuest(t, lv, id, t.TempDir())
	u.create(t, id, "2.0")
	v := u.attach(t, id, dom.Name)
	connected := func(when string) {
		t.Helper()
		if ok, err := swtpm.Connected(v.Sockets.Ctrl); !ok || err != nil {
			t.Fatalf("%s: the running guest is not connected to its vTPM (%v)", when, err)
		}
	}
	connected("after attach")
	pid := u.d.Swtpm().Running(id)

	u.stop()
	if syscall.Kill(pid, 0) != nil {
		t.Fatal("vtpmd's shutdown stopped the swtpm a running guest holds")
	}
	u = startLibvirtDaemon(t, dir, "external")
	v = u.wait(t, id, "active")
	if got := u.d.Swtpm().Running(id); got != pid {
		t.Fatalf("after the restart vTPM runs swtpm %d, not the guest's %d", got, pid)
	}
	connected("after vtpmd restarted")

	// The guest's swtpm dies; the supervisor starts another, which the
	// guest does not know.
	syscall.Kill(pid, syscall.SIGKILL)
	v = u.wait(t, id, "error")
	if guestState(t, lv, dom) != golibvirt.DomainRunning || !strings.Contains(v.Reason, "not connected to its vTPM") {
		t.Fatalf("after the guest's swtpm died: guest %v, reason %q", guestState(t, lv, dom), v.Reason)
	}
	if _, err := u.c.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if _, err := u.c.Wait(wctx, id, func(v api.VTPM) bool { return v.Phase == "stopped" }, nil); err != nil {
		t.Fatalf("stopping the disconnected vTPM: %v", err)
	}
	if _, err := u.c.Start(ctx, id); err != nil {
		t.Fatal(err)
	}
	if v = u.wait(t, id, "active"); v.Reason != "" {
		t.Fatalf("after stop and start: reason %q", v.Reason)
	}
	connected("after stop and start")

	// Deleting the vTPM stops its swtpm even though it is kept across restarts.
	pid = u.d.Swtpm().Running(id)
	if _, err := u.c.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	u.waitGone(t, id)
	for range 100 {
		if syscall.Kill(pid, 0) != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("swtpm %d outlived its deleted vTPM", pid)
}

// TestLibvirtDrift plants what a crash or a hand on the host leaves: a
// libvirt vTPM secret and a TPM state with no record, and a vTPM whose
// domain was undefined behind vtpmd's back. Drift names each; repair
// deletes the orphans only.
func TestLibvirtDrift(t *testing.T) {
	lv := connectLibvirt(t)
	dir := t.TempDir()
	u := startLibvirtDaemon(t, dir, "emulator")
	ctx := context.Background()

	orphanSecret := uuid.NewString()
	xml, _ := libvirt.SecretXML(orphanSecret, false, false, uuid.NewString())
	if _, err := lv.SecretDefineXML(xml, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if s, err := lv.SecretLookupByUUID(golibvirt.UUID(uuid.MustParse(orphanSecret))); err == nil {
			lv.SecretUndefine(s)
		}
	})
	orphanState := filepath.Join("/var/lib/libvirt/swtpm", uuid.NewString())
	if err := os.MkdirAll(filepath.Join(orphanState, "tpm2"), 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(orphanState) })

	id := uuid.NewString()
	dom := defineGuest(t, lv, id, dir)
	u.create(t, id, "2.0")
	u.attach(t, id, dom.Name)
	lv.DomainDestroy(dom)
	if err := lv.DomainUndefineFlags(dom, golibvirt.DomainUndefineNvram|golibvirt.DomainUndefineKeepTpm); err != nil {
		t.Fatal(err)
	}

	find := func(d api.Drift, kind, object string) *api.Finding {
		for _, f := range d.Findings {
			if f.Kind == kind && f.Object == object {
				return &f
			}
		}
		return nil
	}
	drift, err := u.c.Drift(ctx, "lv-host", false)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range [][2]string{{"orphan_secret", orphanSecret}, {"orphan_state", orphanState}, {"missing_domain", dom.Name}} {
		if f := find(drift, want[0], want[1]); f == nil || f.Deleted {
			t.Fatalf("drift lacks %s %s: %+v", want[0], want[1], drift.Findings)
		}
	}
	if _, err := os.Stat(orphanState); err != nil {
		t.Fatal("looking at drift deleted something")
	}

	repaired, err := u.c.Drift(ctx, "lv-host", true)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range [][2]string{{"orphan_secret", orphanSecret}, {"orphan_state", orphanState}} {
		if f := find(repaired, want[0], want[1]); f == nil || !f.Deleted {
			t.Fatalf("repair did not delete %s %s: %+v", want[0], want[1], repaired.Findings)
		}
	}
	if _, err := lv.SecretLookupByUUID(golibvirt.UUID(uuid.MustParse(orphanSecret))); err == nil {
		t.Fatal("the orphan secret is still defined")
	}
	if _, err := os.Stat(orphanState); !os.IsNotExist(err) {
		t.Fatal("the orphan state is still there")
	}
	if f := find(repaired, "missing_domain", dom.Name); f == nil || f.Deleted {
		t.Fatalf("repair touched the record of a vTPM whose domain is gone: %+v", f)
	}
	if _, err := u.c.Get(ctx, id); err != nil {
		t.Fatalf("the vTPM record is gone: %v", err)
	}
}

// processUser names the user process pid runs as.
func processUser(t *testing.T, pid string) string {
	t.Helper()
	status, err := os.ReadFile("/proc/" + strings.TrimSpace(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(status)) {
		if uid, ok := strings.CutPrefix(line, "Uid:"); ok {
			u, err := user.LookupId(strings.Fields(uid)[0])
			if err != nil {
				t.Fatal(err)
			}
			return u.Username
		}
	}
	t.Fatalf("no Uid in /proc/%s/status", pid)
	return ""
}
