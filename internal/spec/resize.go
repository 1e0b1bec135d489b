package spec

import (
	"fmt"

	"github.com/vtpmd/vtpmd/api"
)

// ResizeKind is what resizing an instance to a new flavor and image does to
// its vTPM.
type ResizeKind string

// The kinds of resize, as Nova's libvirt driver tells them apart
// (finish_migration, finish_revert_migration, confirm_migration).
const (
	// ResizeKeep: a vTPM before and after, of the same version and model.
	// The state is kept; confirm changes nothing, revert restores the old
	// spec.
	ResizeKeep ResizeKind = "keep"
	// ResizeNewTPM: a vTPM before and after, of another version or model
	// (Nova compares the two as one pair). The instance gets a new TPM
	// now; the old one is kept until confirm removes it, and revert puts
	// it back.
	ResizeNewTPM ResizeKind = "new_tpm"
	// ResizeAdd: no vTPM before, one after. It is made now; revert
	// deletes it, key and all.
	ResizeAdd ResizeKind = "add"
	// ResizeRemove: a vTPM before, none after. It is kept (stopped)
	// until confirm deletes it, key and all; revert gives it back.
	ResizeRemove ResizeKind = "remove"
)

// Resize decides what resizing from old to new (each nil: no vTPM) does,
// or refuses it with an *Error, in this order:
//
//  1. neither has a vTPM → no_vtpm_requested: nothing to resize.
//  2. either is a Hyper-V vTPM → resize_not_supported: Hyper-V's
//     hypervisor resizes its own VMs.
//  3. only new has one → ResizeAdd; only old → ResizeRemove. Secret
//     security is not compared: no secret changes hands.
//  4. both have one and the secret security changes to or from
//     deployment → secret_security_change_not_supported (Nova's
//     _validate_vtpm_secret_security: the key-manager secret would change
//     owner between the user and the service). user ↔ host is allowed
//     (both keep the user's secret); the spec's unset mode is already
//     user.
//  5. same version and model → ResizeKeep; otherwise ResizeNewTPM.
func Resize(old, new *Spec) (ResizeKind, error) {
	switch {
	case old == nil && new == nil:
		return "", &Error{Code: api.CodeNoVTPMRequested, Message: "The instance has no vTPM and the new flavor and image ask for none: there is nothing to resize."}
	case old != nil && old.Hypervisor == HyperV, new != nil && new.Hypervisor == HyperV:
		return "", &Error{Code: api.CodeResizeNotSupported, Message: "A Hyper-V vTPM is not resized by vtpmd: Hyper-V keeps a VM's vTPM through its own resize."}
	case old == nil:
		return ResizeAdd, nil
	case new == nil:
		return ResizeRemove, nil
	}
	if old.SecretSecurity != new.SecretSecurity && (old.SecretSecurity == Deployment || new.SecretSecurity == Deployment) {
		return "", &Error{Code: api.CodeSecretSecurityChangeNotSupported, Message: fmt.Sprintf(
			"The vTPM's secret security is %s and the new flavor's %s is %s: resizing between deployment secret security and the other modes is not supported, as the key-manager secret would change owner.",
			old.SecretSecurity, FlavorTPMSecretSecurity, new.SecretSecurity)}
	}
	if old.Version == new.Version && old.Model == new.Model {
		return ResizeKeep, nil
	}
	return ResizeNewTPM, nil
}
