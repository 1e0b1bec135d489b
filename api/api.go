// Package api holds the wire types of vtpmd's REST API and of vtpmctl's JSON
// output. It has no behaviour; the server and the client share it.
package api

// ResolveRequest asks what vTPM a flavor and image give, without creating it.
type ResolveRequest struct {
	FlavorName  string            `json:"flavor_name,omitempty"`
	FlavorSpecs map[string]string `json:"flavor_specs,omitempty"`
	ImageName   string            `json:"image_name,omitempty"`
	ImageProps  map[string]string `json:"image_props,omitempty"`
}

// Resolution is the outcome of a request that was not refused.
type Resolution struct {
	// VTPM is null when the request asks for no vTPM.
	VTPM *VTPMSpec `json:"vtpm"`
	// RequiredTraits are the traits the serving host must offer, sorted.
	RequiredTraits []string `json:"required_traits"`
}

// VTPMSpec is a resolved vTPM.
type VTPMSpec struct {
	Version string `json:"version"`
	// Model is tpm-tis or tpm-crb; null on Hyper-V, where the hypervisor decides.
	Model          *string `json:"model"`
	SecretSecurity string  `json:"secret_security,omitempty"`
	// Hypervisor is "hyperv" for a Hyper-V vTPM, absent for libvirt/QEMU.
	Hypervisor string `json:"hypervisor,omitempty"`
	// Keys are the key-manager secret UUIDs for a Hyper-V vTPM (present, maybe
	// empty, on Hyper-V; absent otherwise).
	Keys []string `json:"keys,omitzero"`
}

// ProjectHeader scopes a request to one project (tenant): such a caller sees
// and changes only that project's vTPMs. The operator may scope itself to
// any project with it; a tenant may only repeat its own. It names no one:
// who the caller is comes from its client certificate, its Keystone token
// or the operator's socket.
const ProjectHeader = "X-Project-ID"

// TokenHeader carries a Keystone token, as every OpenStack API takes it,
// to a vtpmd that runs with Keystone authentication: the token's project
// and roles say who the caller is and what it may do.
const TokenHeader = "X-Auth-Token"
