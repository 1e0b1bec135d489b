package libvirt

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os/exec"
	"os/user"
	"slices"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/internal/spec"
)

// Capabilities implements agent.Backend from libvirt's domain capabilities
// (<tpm supported>, its models, backend models and versions) and swtpm's
// --print-capabilities, as Nova's libvirt driver reads them.
func (b *Backend) Capabilities(ctx context.Context) (spec.Capabilities, error) {
	if !b.cfg.EnableVTPM {
		return spec.Capabilities{}, nil
	}
	lv, err := b.conn()
	if err != nil {
		return spec.Capabilities{}, err
	}
	var xml string
	for _, virt := range []string{"kvm", "qemu"} { // TCG when the host has no KVM
		xml, err = lv.ConnectGetDomainCapabilities(nil, golibvirt.OptString{"x86_64"}, golibvirt.OptString{"q35"}, golibvirt.OptString{virt}, 0)
		if err == nil {
			break
		}
	}
	if err != nil {
		return spec.Capabilities{}, fmt.Errorf("reading libvirt's domain capabilities: %w", err)
	}
	out, err := exec.CommandContext(ctx, "swtpm", "socket", "--print-capabilities").Output()
	if err != nil {
		return spec.Capabilities{}, fmt.Errorf("vTPM is enabled but swtpm does not run (%w); install swtpm", err)
	}
	caps, err := HostCapabilities(xml, out, b.cfg.Mode)
	caps.SecretSecurity = b.cfg.SecretSecurity
	return caps, err
}

// HostCapabilities turns libvirt's domain capabilities XML and swtpm's
// capabilities JSON into what a host with vTPM enabled offers in mode, or
// says what is missing.
func HostCapabilities(domCapsXML string, swtpmCaps []byte, mode Mode) (spec.Capabilities, error) {
	var dc libvirtxml.DomainCaps
	if err := dc.Unmarshal(domCapsXML); err != nil {
		return spec.Capabilities{}, fmt.Errorf("parsing libvirt's domain capabilities: %w", err)
	}
	if dc.Devices == nil || dc.Devices.TPM == nil || dc.Devices.TPM.Supported != "yes" {
		return spec.Capabilities{}, fmt.Errorf("vTPM is enabled but libvirt reports no TPM device support for %s guests", dc.Domain)
	}
	enum := func(name string) []string {
		for _, e := range dc.Devices.TPM.Enums {
			if e.Name == name {
				return e.Values
			}
		}
		return nil
	}
	if !slices.Contains(enum("backendModel"), string(mode)) {
		return spec.Capabilities{}, fmt.Errorf("vTPM is enabled in %s mode but libvirt offers TPM backends %v only", mode, enum("backendModel"))
	}
	var sw struct{ Features []string }
	if err := json.Unmarshal(swtpmCaps, &sw); err != nil {
		return spec.Capabilities{}, fmt.Errorf("parsing swtpm's capabilities: %w", err)
	}
	caps := spec.Capabilities{Enabled: true}
	listed := enum("backendVersion")
	for _, v := range []spec.Version{spec.V12, spec.V20} {
		// libvirt older than 8 lists no versions: both are assumed.
		if (len(listed) == 0 || slices.Contains(listed, string(v))) && slices.Contains(sw.Features, "tpm-"+string(v)) {
			caps.Versions = append(caps.Versions, v)
		}
	}
	if len(caps.Versions) == 0 {
		return spec.Capabilities{}, fmt.Errorf("vTPM is enabled but libvirt (versions %v) and swtpm (features %v) share no TPM version", listed, sw.Features)
	}
	for _, m := range []spec.Model{spec.TIS, spec.CRB} {
		if slices.Contains(enum("model"), string(m)) {
			caps.Models = append(caps.Models, m)
		}
	}
	return caps, nil
}

// QEMUGroup asks libvirtd at socket which group it runs QEMU as: the group
// that must reach the sockets of external-mode vTPMs. "" means root (or no
// DAC security driver), which needs nothing.
func QEMUGroup(socket string) (string, error) {
	lv, err := dial(socket)
	if err != nil {
		return "", err
	}
	defer lv.Disconnect()
	xml, err := lv.ConnectGetCapabilities()
	if err != nil {
		return "", fmt.Errorf("reading libvirt's capabilities: %w", err)
	}
	return qemuGroup(xml)
}

// qemuGroup reads the group from the base labels of libvirt's DAC security
// driver in its capabilities XML ("+uid:+gid" per domain type).
func qemuGroup(capsXML string) (string, error) {
	labels, err := dacLabels(capsXML)
	if err != nil {
		return "", err
	}
	var groups []string
	for _, typ := range slices.Sorted(maps.Keys(labels)) {
		if _, g, ok := strings.Cut(labels[typ], ":"); ok && !slices.Contains(groups, g) {
			groups = append(groups, g)
		}
	}
	switch {
	case len(groups) == 0:
		return "", nil
	case len(groups) > 1:
		return "", fmt.Errorf("libvirt runs QEMU as several groups (%s): choose the socket group", strings.Join(groups, ", "))
	}
	g := groups[0]
	if gid, numeric := strings.CutPrefix(g, "+"); numeric {
		grp, err := user.LookupGroupId(gid)
		if err != nil {
			return "", fmt.Errorf("the group libvirt runs QEMU as: %w", err)
		}
		g = grp.Name
	}
	if g == "root" {
		return "", nil
	}
	return g, nil
}
