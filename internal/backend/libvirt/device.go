package libvirt

import (
	"fmt"

	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/internal/spec"
)

// TPMDevice is the guest's TPM device. Emulator mode means what Nova
// generates: <tpm model=…><backend type='emulator' version=…><encryption
// secret=…/></backend></tpm>. External mode connects to vtpmd's swtpm
// control socket: <backend type='external'><source type='unix'
// mode='connect' path=…/></backend>.
func TPMDevice(s spec.Spec, mode Mode, secretUUID, ctrlSocket string) *libvirtxml.DomainTPM {
	model := s.Model
	if model == "" {
		model = spec.TIS
	}
	dev := &libvirtxml.DomainTPM{Model: string(model), Backend: &libvirtxml.DomainTPMBackend{}}
	if mode == External {
		dev.Backend.External = &libvirtxml.DomainTPMBackendExternal{
			Source: &libvirtxml.DomainTPMBackendExternalSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{Mode: "connect", Path: ctrlSocket}},
		}
		return dev
	}
	dev.Backend.Emulator = &libvirtxml.DomainTPMBackendEmulator{
		Version:    string(s.Version),
		Encryption: &libvirtxml.DomainTPMBackendEncryption{Secret: secretUUID},
	}
	return dev
}

// SecretXML is the libvirt secret that carries a vTPM's key, as Nova
// defines it: usage type vtpm named by the instance, the key-manager
// secret's UUID as its own.
func SecretXML(secretUUID string, ephemeral, private bool, instanceID string) (string, error) {
	s := libvirtxml.Secret{
		Ephemeral:   yesNo(ephemeral),
		Private:     yesNo(private),
		Description: "vTPM secret of instance " + instanceID,
		UUID:        secretUUID,
		Usage:       &libvirtxml.SecretUsage{Type: "vtpm", Name: instanceID},
	}
	return s.Marshal()
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// AttachTPM returns domainXML with dev as its only TPM device; every other
// element is kept. It returns domainXML itself when dev is already there.
func AttachTPM(domainXML string, dev *libvirtxml.DomainTPM) (string, error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(domainXML); err != nil {
		return "", fmt.Errorf("parsing domain XML: %w", err)
	}
	if d.Devices == nil {
		d.Devices = &libvirtxml.DomainDeviceList{}
	}
	if len(d.Devices.TPMs) == 1 && sameTPM(&d.Devices.TPMs[0], dev) {
		return domainXML, nil
	}
	d.Devices.TPMs = []libvirtxml.DomainTPM{*dev}
	return d.Marshal()
}

// DetachTPM returns domainXML without TPM devices, and whether it had one.
func DetachTPM(domainXML string) (string, bool, error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(domainXML); err != nil {
		return "", false, fmt.Errorf("parsing domain XML: %w", err)
	}
	if d.Devices == nil || len(d.Devices.TPMs) == 0 {
		return domainXML, false, nil
	}
	d.Devices.TPMs = nil
	out, err := d.Marshal()
	return out, true, err
}

// sameTPM compares what vtpmd sets of a TPM device; libvirt adds aliases
// and addresses of its own.
func sameTPM(have, want *libvirtxml.DomainTPM) bool {
	a, b := *have, *want
	a.Alias, a.Address, a.ACPI = nil, nil, nil
	b.Alias, b.Address, b.ACPI = nil, nil, nil
	x, err1 := (&libvirtxml.Domain{Devices: &libvirtxml.DomainDeviceList{TPMs: []libvirtxml.DomainTPM{a}}}).Marshal()
	y, err2 := (&libvirtxml.Domain{Devices: &libvirtxml.DomainDeviceList{TPMs: []libvirtxml.DomainTPM{b}}}).Marshal()
	return err1 == nil && err2 == nil && x == y
}
