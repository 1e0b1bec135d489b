package libvirt

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
)

func TestMayReadWrite(t *testing.T) {
	const dev = fs.ModeDevice | fs.ModeCharDevice
	for _, c := range []struct {
		name string
		mode fs.FileMode
		uid  uint32   // the process's
		gids []uint32 // the process's
		want bool
	}{
		{"root, whatever the mode", dev, 0, []uint32{0}, true},
		{"owner, rw", dev | 0o600, 7, []uint32{50}, true},
		{"owner, read only", dev | 0o400, 7, []uint32{50}, false},
		{"owner: the owner's bits decide though the group's allow", dev | 0o066, 7, []uint32{992}, false},
		{"group member (the label's group)", dev | 0o660, 50, []uint32{992}, true},
		{"group member (a supplementary group)", dev | 0o660, 50, []uint32{995, 992}, true},
		{"group member, read only", dev | 0o640, 50, []uint32{992}, false},
		{"group member: the group's bits decide though the others' allow", dev | 0o606, 50, []uint32{992}, false},
		{"not a member (Debian's /dev/kvm)", dev | 0o660, 999, []uint32{995}, false},
		{"not a member, world rw (systemd's /dev/kvm)", dev | 0o666, 999, []uint32{995}, true},
		{"not a member, world read only", dev | 0o664, 999, []uint32{995}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := fileAccess{Mode: c.mode, UID: 7, GID: 992}
			if got := mayReadWrite(f, c.uid, c.gids); got != c.want {
				t.Fatalf("mayReadWrite(%v owned by 7:992, uid %d, groups %v) = %v, want %v", c.mode, c.uid, c.gids, got, c.want)
			}
		})
	}
}

// throwaway makes a system user with a group of its own, and a group
// without members, both removed when the test ends.
func throwaway(t *testing.T) (u *user.User, other *user.Group) {
	t.Helper()
	if os.Geteuid() != 0 {
		citest.Missing(t, "making users needs root")
	}
	suffix := make([]byte, 3)
	rand.Read(suffix)
	name, group := "vtpmd-q-"+hex.EncodeToString(suffix), "vtpmd-g-"+hex.EncodeToString(suffix)
	run(t, "groupadd", "-r", group)
	t.Cleanup(func() { exec.Command("groupdel", group).Run() })
	run(t, "useradd", "-r", "-U", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", name)
	t.Cleanup(func() { exec.Command("userdel", name).Run() })
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	other, err = user.LookupGroup(group)
	if err != nil {
		t.Fatal(err)
	}
	return u, other
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// standInDevice is a file with /dev/kvm's mode (0660), owned by root and
// group, in a directory every user may enter.
func standInDevice(t *testing.T, group *user.Group) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	dev := filepath.Join(dir, "kvm")
	gid, _ := strconv.Atoi(group.Gid)
	if err := os.WriteFile(dev, nil, 0o660); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dev, 0, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dev, 0o660); err != nil { // past the umask
		t.Fatal(err)
	}
	return dev
}

// dacCaps is libvirt's capabilities XML with the DAC labels libvirt 9
// writes for QEMU run as label.
func dacCaps(label string) string {
	return "<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel><secmodel><model>dac</model><doi>0</doi>" +
		"<baselabel type='kvm'>" + label + "</baselabel><baselabel type='qemu'>" + label + "</baselabel></secmodel></host></capabilities>"
}

// TestCheckKVM: for a real user, first outside the device's group and
// then added to it (as scripts/libvirtd-up.sh does for libvirt-qemu),
// checkKVM answers as the kernel does when that user opens the device, and
// names the user, the group and the fix.
func TestCheckKVM(t *testing.T) {
	u, other := throwaway(t)
	dev := standInDevice(t, other)
	kernel := func() bool { // the kernel's answer, as the user
		return exec.Command("runuser", "-u", u.Username, "--", "test", "-r", dev, "-a", "-w", dev).Run() == nil
	}
	for _, label := range []string{"+" + u.Uid + ":+" + u.Gid, u.Username + ":" + u.Username} {
		p, err := checkKVM(dacCaps(label), dev)
		if err != nil {
			t.Fatal(err)
		}
		want := kvmProblem{User: u.Username, Device: dev, DeviceGroup: other.Name,
			Fix: fmt.Sprintf("usermod -aG %s %s, then restart libvirtd", other.Name, u.Username)}
		if p == nil || *p != want {
			t.Fatalf("label %s, user outside %s: %+v, want %+v", label, other.Name, p, want)
		}
		if kernel() {
			t.Fatalf("the kernel lets %s open %s, checkKVM says it may not", u.Username, dev)
		}
	}

	run(t, "usermod", "-aG", other.Name, u.Username)
	for _, label := range []string{"+" + u.Uid + ":+" + u.Gid, u.Username + ":" + u.Username} {
		if p, err := checkKVM(dacCaps(label), dev); p != nil || err != nil {
			t.Fatalf("label %s, user in %s: %+v, %v; want no problem", label, other.Name, p, err)
		}
	}
	if !kernel() {
		t.Fatalf("the kernel does not let %s open %s, checkKVM says it may", u.Username, dev)
	}

	// Nothing to say without a device, or with QEMU as root, or without
	// DAC, though the device is now closed to the user.
	if err := os.Chmod(dev, 0o600); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct{ caps, dev string }{
		"no device": {dacCaps("+" + u.Uid + ":+" + u.Gid), filepath.Join(t.TempDir(), "kvm")},
		"root":      {dacCaps("+0:+0"), dev},
		"no DAC":    {"<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel></host></capabilities>", dev},
	} {
		if p, err := checkKVM(c.caps, c.dev); p != nil || err != nil {
			t.Errorf("%s: %+v, %v; want no problem", name, p, err)
		}
	}
	if _, err := checkKVM("<capabilities", dev); err == nil {
		t.Error("bad capabilities XML: no error")
	}
}

// libvirtdCaps checks that libvirtd runs (failing under CI=true, skipping
// otherwise when it does not) and returns its capabilities XML.
func libvirtdCaps(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(DefaultSocket); err != nil {
		citest.Missing(t, "libvirtd is not running (scripts/libvirtd-up.sh starts it)")
	}
	lv, err := dial(DefaultSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer lv.Disconnect()
	xml, err := lv.ConnectGetCapabilities()
	if err != nil {
		t.Fatal(err)
	}
	return xml
}

// TestNewWarnsKVM: started against the real libvirtd on a host whose KVM
// device (a stand-in) libvirt's QEMU user cannot open, the backend starts
// and logs one warning naming the user, the device's group and the fix;
// once the device allows it, no warning.
func TestNewWarnsKVM(t *testing.T) {
	_, other := throwaway(t)
	label, err := dacLabel(libvirtdCaps(t))
	if err != nil {
		t.Fatal(err)
	}
	if label == "" {
		citest.Missing(t, "libvirtd runs QEMU as root (scripts/libvirtd-up.sh makes it libvirt-qemu)")
	}
	q, err := lookupQEMUUser(label)
	if err != nil {
		t.Fatal(err)
	}
	dev := standInDevice(t, other)
	warnings := func() []map[string]any {
		var buf bytes.Buffer
		rt, err := swtpmhost.New(swtpmhost.Config{Root: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		b, err := New(context.Background(), Config{Mode: Emulator, Swtpm: rt, KVMDevice: dev,
			Log: slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelWarn}))})
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		b.lv.Disconnect()
		var out []map[string]any
		for _, line := range bytes.Split(bytes.TrimSpace(buf.Bytes()), []byte("\n")) {
			var m map[string]any
			if len(line) > 0 && json.Unmarshal(line, &m) == nil {
				out = append(out, m)
			}
		}
		return out
	}

	w := warnings()
	if len(w) != 1 {
		t.Fatalf("QEMU's user %s outside %s: warnings %v, want one", q.name, other.Name, w)
	}
	for k, want := range map[string]string{
		"level": "WARN", "user": q.name, "device": dev, "device_group": other.Name,
		"fix": fmt.Sprintf("usermod -aG %s %s, then restart libvirtd", other.Name, q.name),
	} {
		if w[0][k] != want {
			t.Errorf("%s = %v, want %q (%v)", k, w[0][k], want, w[0])
		}
	}
	if msg, _ := w[0]["msg"].(string); !strings.Contains(msg, "probes QEMU again on every call") {
		t.Errorf("the warning does not say why: %q", msg)
	}

	if err := os.Chmod(dev, 0o666); err != nil {
		t.Fatal(err)
	}
	if w := warnings(); len(w) != 0 {
		t.Fatalf("device open to all: warnings %v", w)
	}
}

// TestLibvirtdQEMUMayUseKVM: on a host with /dev/kvm, libvirtd as
// scripts/libvirtd-up.sh sets it up runs QEMU as a user who may open it.
// Otherwise libvirt probes QEMU again on every call and the libvirt tests
// of internal/daemon time out.
func TestLibvirtdQEMUMayUseKVM(t *testing.T) {
	if _, err := os.Stat(KVMDevice); err != nil {
		t.Skipf("no %s: nothing to check", KVMDevice)
	}
	p, err := checkKVM(libvirtdCaps(t), KVMDevice)
	if err != nil {
		t.Fatal(err)
	}
	if p != nil {
		t.Fatalf("libvirt runs QEMU as %s, who cannot open %s (group %s): run scripts/libvirtd-up.sh, or %s", p.User, p.Device, p.DeviceGroup, p.Fix)
	}
}
