package spec

// Code is a stable, machine-readable reason for a refusal. Codes appear in
// API responses and CLI output and never change meaning.
type Code string

// Refusal codes of Resolve and Place.
const (
	// CodeFlavorImageConflict: flavor and image set the same setting to different values.
	CodeFlavorImageConflict Code = "flavor_image_conflict"
	// CodeInvalidTPMVersion: a version other than exactly "1.2" or "2.0".
	CodeInvalidTPMVersion Code = "invalid_tpm_version"
	// CodeInvalidTPMModel: a model other than tpm-tis or tpm-crb.
	CodeInvalidTPMModel Code = "invalid_tpm_model"
	// CodeInvalidHypervisorType: an image hypervisor_type that Nova does not
	// know (see hypervisorTypes), the empty string included.
	CodeInvalidHypervisorType Code = "invalid_hypervisor_type"
	// CodeCRBRequiresTPM2: tpm-crb with a TPM 1.2.
	CodeCRBRequiresTPM2 Code = "crb_requires_tpm2"
	// CodeInvalidSecretSecurity: hw:tpm_secret_security other than user, host or deployment.
	CodeInvalidSecretSecurity Code = "invalid_secret_security"
	// CodePropertyNotSupported: a property of the other hypervisor's surface.
	CodePropertyNotSupported Code = "property_not_supported"
	// CodeInvalidVTPMPolicy: os_vtpm or os:vtpm other than disabled, optional or required.
	CodeInvalidVTPMPolicy Code = "invalid_vtpm_policy"
	// CodeVTPMPolicyConflict: image and flavor policies that cannot both hold.
	CodeVTPMPolicyConflict Code = "vtpm_policy_conflict"
	// CodeGen2Required: a Hyper-V vTPM on an image that is not Generation 2.
	CodeGen2Required Code = "gen2_required"
	// CodeTooManyVTPMKeys: more than MaxVTPMKeys entries in os_vtpm_keys.
	CodeTooManyVTPMKeys Code = "too_many_vtpm_keys"
	// CodeInvalidVTPMKey: an os_vtpm_keys entry that is empty, repeated or not a canonical UUID.
	CodeInvalidVTPMKey Code = "invalid_vtpm_key"
	// CodeVTPMKeysWithoutVTPM: os_vtpm_keys on a request that gets no vTPM.
	CodeVTPMKeysWithoutVTPM Code = "vtpm_keys_without_vtpm"
	// CodeNoValidHost: no host offers every required trait with free capacity.
	CodeNoValidHost Code = "no_valid_host"
)

// Error is a refused request. Match it with errors.As and compare Code;
// Message is for people and names the flavor, image and values involved.
type Error struct {
	Code    Code
	Message string
	// Traits, for CodeNoValidHost, are the required traits that no host
	// offers (or the closest host lacks); nil when capacity was the problem.
	Traits []string
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Message }
