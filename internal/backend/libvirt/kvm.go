package libvirt

import (
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"libvirt.org/go/libvirtxml"
)

// KVMDevice is the device QEMU opens to run a guest under KVM.
const KVMDevice = "/dev/kvm"

// kvmProblem says why libvirt's QEMU user cannot open the KVM device, and
// how to fix it.
//
// libvirt caches what it learnt by probing QEMU, and the cache holds only
// while whether KVM is usable stays what it was at the probe. libvirt
// decides that by opening the device as its QEMU user, and keeps the answer
// until the device changes. When that user cannot open the device, a cache
// probed with KVM is stale on every call: libvirt probes QEMU again each
// time (seconds for domain capabilities, more for capabilities), and every
// vTPM operation crawls. libvirt logs this only at debug level ("KVM was
// enabled when probing … but it is not available now").
type kvmProblem struct {
	User        string // the user libvirt runs QEMU as (a name, or "+uid")
	Device      string // the KVM device
	DeviceGroup string // the device's group (a name, or "+gid")
	Fix         string // what the operator should do
}

// checkKVM reads from capsXML (libvirt's capabilities) which user and group
// libvirt runs KVM guests as, and says whether that process may open device
// for reading and writing. It returns nil when it may, when device does not
// exist, or when libvirt runs QEMU as root or without its DAC driver.
//
// The process's groups are the label's group and the user's groups as
// os/user lists them (libvirt sets the label's group and the groups that
// list the user as a member; a primary group of the user's own that is not
// the label's is counted too, so a warning is never false).
func checkKVM(capsXML, device string) (*kvmProblem, error) {
	fi, err := os.Stat(device)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("reading %s: %w", device, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil, fmt.Errorf("reading %s: no owner", device)
	}
	label, err := dacLabel(capsXML)
	if err != nil || label == "" {
		return nil, err
	}
	q, err := lookupQEMUUser(label)
	if err != nil {
		return nil, err
	}
	f := fileAccess{Mode: fi.Mode(), UID: st.Uid, GID: st.Gid}
	if mayReadWrite(f, q.uid, q.gids) {
		return nil, nil
	}
	p := &kvmProblem{User: q.name, Device: device, DeviceGroup: "+" + strconv.FormatUint(uint64(st.Gid), 10)}
	if g, err := user.LookupGroupId(strconv.FormatUint(uint64(st.Gid), 10)); err == nil {
		p.DeviceGroup = g.Name
	}
	if f.Mode.Perm()&0o060 == 0o060 && st.Gid != 0 {
		p.Fix = fmt.Sprintf("usermod -aG %s %s, then restart libvirtd", p.DeviceGroup, p.User)
	} else {
		p.Fix = fmt.Sprintf("give %s mode 0660 and a group of its own (a udev rule), add %s to that group, then restart libvirtd", device, p.User)
	}
	return p, nil
}

// fileAccess is what the kernel's permission check reads of a file.
type fileAccess struct {
	Mode     fs.FileMode
	UID, GID uint32
}

// mayReadWrite reports whether a process running as uid with the groups
// gids may open f for reading and writing, by the Unix rule: root may;
// otherwise the owner's bits decide for the owner, the group's bits for a
// member of the group, the others' bits for everyone else, and the first
// class that matches decides even when a later one would allow more. ACLs
// are not read.
func mayReadWrite(f fileAccess, uid uint32, gids []uint32) bool {
	perm := f.Mode.Perm()
	switch {
	case uid == 0:
		return true
	case uid == f.UID:
		return perm&0o600 == 0o600
	case slices.Contains(gids, f.GID):
		return perm&0o060 == 0o060
	default:
		return perm&0o006 == 0o006
	}
}

// dacLabels are the base labels ("user:group" per domain type) of libvirt's
// DAC security driver in its capabilities XML, by domain type.
func dacLabels(capsXML string) (map[string]string, error) {
	var caps libvirtxml.Caps
	if err := caps.Unmarshal(capsXML); err != nil {
		return nil, fmt.Errorf("libvirt's capabilities: %w", err)
	}
	labels := map[string]string{}
	for _, m := range caps.Host.SecModel {
		if m.Name != "dac" {
			continue
		}
		for _, l := range m.Labels {
			labels[l.Type] = l.Value
		}
	}
	return labels, nil
}

// dacLabel is the DAC base label of KVM guests ("" when libvirt has no DAC
// driver, or runs QEMU as root).
func dacLabel(capsXML string) (string, error) {
	labels, err := dacLabels(capsXML)
	if err != nil {
		return "", err
	}
	l, ok := labels["kvm"]
	if !ok {
		l = labels["qemu"]
	}
	if l == "+0:+0" || l == "root:root" {
		return "", nil
	}
	return l, nil
}

// qemuUser is the process libvirt runs QEMU as.
type qemuUser struct {
	name string // the user's name, or "+uid" when it has none
	uid  uint32
	gids []uint32 // the label's group first, then the user's groups
}

// lookupQEMUUser resolves a DAC label ("+uid:+gid", or names) to the user,
// its uid and the groups its process holds.
func lookupQEMUUser(label string) (qemuUser, error) {
	us, gs, ok := strings.Cut(label, ":")
	if !ok {
		return qemuUser{}, fmt.Errorf("libvirt's DAC label %q: want user:group", label)
	}
	var q qemuUser
	var u *user.User
	if id, numeric := strings.CutPrefix(us, "+"); numeric {
		uid, err := strconv.ParseUint(id, 10, 32)
		if err != nil {
			return qemuUser{}, fmt.Errorf("libvirt's DAC label %q: %w", label, err)
		}
		q.uid, q.name = uint32(uid), us
		if u, err = user.LookupId(id); err != nil {
			u = nil // a uid without a name has only the label's group
		}
	} else {
		var err error
		if u, err = user.Lookup(us); err != nil {
			return qemuUser{}, fmt.Errorf("the user libvirt runs QEMU as: %w", err)
		}
		uid, err := strconv.ParseUint(u.Uid, 10, 32)
		if err != nil {
			return qemuUser{}, fmt.Errorf("user %s: uid %q: %w", us, u.Uid, err)
		}
		q.uid = uint32(uid)
	}
	gid, numeric := strings.CutPrefix(gs, "+")
	if !numeric {
		g, err := user.LookupGroup(gs)
		if err != nil {
			return qemuUser{}, fmt.Errorf("the group libvirt runs QEMU as: %w", err)
		}
		gid = g.Gid
	}
	ids := []string{gid}
	if u != nil {
		q.name = u.Username
		more, err := u.GroupIds()
		if err != nil {
			return qemuUser{}, fmt.Errorf("the groups of %s: %w", u.Username, err)
		}
		ids = append(ids, more...)
	}
	for _, s := range ids {
		g, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return qemuUser{}, fmt.Errorf("the groups libvirt runs QEMU with: gid %q: %w", s, err)
		}
		if !slices.Contains(q.gids, uint32(g)) {
			q.gids = append(q.gids, uint32(g))
		}
	}
	return q, nil
}
