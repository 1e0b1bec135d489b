// Package spec is where an instance request becomes a vTPM or a refusal.
//
// A request is what OpenStack users already write: flavor extra specs and
// image properties. Resolve turns it into a Spec (or nil: no vTPM) or into an
// *Error with a stable code; RequiredTraits, HostTraits and Place then decide
// which hosts can serve it. The package does no I/O, so the REST API, the host
// agents, the scheduler and `vtpmctl resolve` all share this one definition.
//
// First, on every surface, the image properties that Nova types when it
// builds its ImageMeta object, before any vTPM rule, in Nova's order. A
// present value outside its type is refused, the empty string included:
//
//  1. hypervisor_type, lowercased as Python does and xapi read as xen, not
//     one of Nova's HVType values → invalid_hypervisor_type.
//  2. hw_tpm_model not tpm-tis or tpm-crb → invalid_tpm_model.
//  3. hw_tpm_version not 1.2 or 2.0 → invalid_tpm_version.
//
// The libvirt/QEMU surface then follows Nova's get_vtpm_constraint exactly,
// in this order:
//
//  1. version = flavor hw:tpm_version, else image hw_tpm_version; both set
//     and different → flavor_image_conflict (before the flavor's value is
//     checked).
//  2. no version → the deployment's default_tpm_version; if that is off too,
//     no vTPM, and the model (the flavor's, or a valid image one) is ignored.
//  3. version (by now the flavor's or the default) not exactly "1.2" or
//     "2.0" → invalid_tpm_version.
//  4. model = flavor hw:tpm_model, else image hw_tpm_model; both set and
//     different → flavor_image_conflict.
//  5. model unset → tpm-tis; the flavor's not tpm-tis or tpm-crb →
//     invalid_tpm_model.
//  6. tpm-crb with version 1.2 → crb_requires_tpm2.
//  7. flavor hw:tpm_secret_security (flavor only; unset → user) not user,
//     host or deployment → invalid_secret_security.
//
// The Hyper-V surface applies when the image's hypervisor_type is "hyperv"
// in any case (seed 003), in this order:
//
//  1. any hw:tpm_* extra spec or hw_tpm_* image property → property_not_supported.
//  2. image os_vtpm (unset → disabled), then flavor os:vtpm, not disabled,
//     optional or required → invalid_vtpm_policy.
//  3. image required with flavor disabled, or image disabled with flavor
//     required → vtpm_policy_conflict. Image required, or image optional with
//     flavor required, gives a vTPM; anything else gives none.
//  4. image os_vtpm_keys: more than 6 entries → too_many_vtpm_keys; an entry
//     that is empty, not a canonical UUID, or repeated → invalid_vtpm_key.
//  5. keys given but no vTPM results → vtpm_keys_without_vtpm.
//  6. a vTPM without image hw_machine_type=hyperv-gen2 → gen2_required.
//
// On any other hypervisor type, os_vtpm, os:vtpm and os_vtpm_keys are refused
// with property_not_supported before the libvirt/QEMU rules. Except for the
// three typed image properties, an empty value counts as unset: Nova reads
// flavor extra specs with "or", so an empty one falls through, while an
// empty image property never becomes a typed object.
package spec

// Version is a TPM specification version.
type Version string

// The TPM versions a vTPM can have.
const (
	V12 Version = "1.2"
	V20 Version = "2.0"
)

// Model is the TPM device the guest sees.
type Model string

// The device models libvirt/QEMU offers.
const (
	TIS Model = "tpm-tis"
	CRB Model = "tpm-crb"
)

// SecretSecurity says who may read a vTPM's secret, and so who can start the
// instance: only its owner's credentials (user), the host at any time (host),
// or the deployment's service credentials (deployment).
type SecretSecurity string

// The secret-security modes, as Nova names them.
const (
	User       SecretSecurity = "user"
	HostMode   SecretSecurity = "host"
	Deployment SecretSecurity = "deployment"
)

// HyperV is the value of Spec.Hypervisor and of the image property
// hypervisor_type that selects the Hyper-V surface.
const HyperV = "hyperv"

// Property names, as flavors and images carry them.
const (
	FlavorTPMVersion        = "hw:tpm_version"
	FlavorTPMModel          = "hw:tpm_model"
	FlavorTPMSecretSecurity = "hw:tpm_secret_security"
	ImageTPMVersion         = "hw_tpm_version"
	ImageTPMModel           = "hw_tpm_model"

	ImageHypervisorType = "hypervisor_type"
	ImageMachineType    = "hw_machine_type"
	ImageVTPMPolicy     = "os_vtpm"
	FlavorVTPMPolicy    = "os:vtpm"
	ImageVTPMKeys       = "os_vtpm_keys"

	// DefaultTPMVersionSetting names Options.DefaultTPMVersion in messages.
	DefaultTPMVersionSetting = "default_tpm_version"
)

// hypervisorTypes are the values of Nova's HVType (nova/objects/fields.py),
// the type of the image property hypervisor_type.
var hypervisorTypes = []string{
	"baremetal", "bhyve", "docker", "fake", "hyperv", "ironic", "kqemu", "kvm", "lxc",
	"lxd", "openvz", "parallels", "phyp", "qemu", "test", "uml", "vbox", "vz",
	"vmware", "xen", "zvm", "prsm",
}

// HyperVGen2 is the hw_machine_type value of a Hyper-V Generation 2 image,
// the only kind of Hyper-V VM that can have a vTPM.
const HyperVGen2 = "hyperv-gen2"

// MaxVTPMKeys bounds os_vtpm_keys: Nova's instance system metadata holds 255
// bytes, room for six UUIDs and their commas.
const MaxVTPMKeys = 6

// Spec is a resolved vTPM: what the host agent builds.
type Spec struct {
	// Version is 1.2 or 2.0; always 2.0 on Hyper-V.
	Version Version
	// Model is the guest device; empty on Hyper-V, where the hypervisor decides.
	Model Model
	// SecretSecurity is the effective mode; empty on Hyper-V.
	SecretSecurity SecretSecurity
	// Hypervisor is HyperV for a Hyper-V vTPM, empty for libvirt/QEMU.
	Hypervisor string
	// Keys are the key-manager secret UUIDs (lowercase) whose material a
	// Hyper-V vTPM receives, in the order the image lists them.
	Keys []string
}

// Request is what an instance asks for. Either map may be nil.
type Request struct {
	FlavorName string
	// FlavorSpecs are the flavor's extra specs (hw:tpm_version, os:vtpm, ...).
	FlavorSpecs map[string]string
	ImageName   string
	// ImageProps are the image's properties (hw_tpm_version, os_vtpm, ...).
	ImageProps map[string]string
}

// Options are the deployment's settings that take part in resolution.
type Options struct {
	// DefaultTPMVersion gives every libvirt/QEMU instance whose flavor and
	// image set no version a vTPM of this version, as the Xen design attached
	// one to every instance. Empty (the default) means off.
	DefaultTPMVersion Version
}
