package spec

import (
	"encoding/json"
	"slices"
)

// Placement traits, with the names Nova and os-traits use, so a placement
// service and its operators read them unchanged.
const (
	TraitTPM12                    = "COMPUTE_SECURITY_TPM_1_2"
	TraitTPM20                    = "COMPUTE_SECURITY_TPM_2_0"
	TraitTPMTIS                   = "COMPUTE_SECURITY_TPM_TIS"
	TraitTPMCRB                   = "COMPUTE_SECURITY_TPM_CRB"
	TraitSecretSecurityUser       = "COMPUTE_SECURITY_TPM_SECRET_SECURITY_USER"
	TraitSecretSecurityHost       = "COMPUTE_SECURITY_TPM_SECRET_SECURITY_HOST"
	TraitSecretSecurityDeployment = "COMPUTE_SECURITY_TPM_SECRET_SECURITY_DEPLOYMENT"
	// TraitHyperVGen2 marks a Hyper-V host that runs Generation 2 VMs with
	// vTPMs. os-traits has no such trait, so it lives in the CUSTOM_ namespace.
	TraitHyperVGen2 = "CUSTOM_HYPERV_GEN2_VTPM"
)

var (
	versionTraits = map[Version]string{V12: TraitTPM12, V20: TraitTPM20}
	modelTraits   = map[Model]string{TIS: TraitTPMTIS, CRB: TraitTPMCRB}
	modeTraits    = map[SecretSecurity]string{
		User: TraitSecretSecurityUser, HostMode: TraitSecretSecurityHost, Deployment: TraitSecretSecurityDeployment,
	}
)

// RequiredTraits are the traits a host must offer to serve s, sorted. A nil
// Spec (no vTPM) requires none.
func (s *Spec) RequiredTraits() []string {
	if s == nil {
		return []string{}
	}
	if s.Hypervisor == HyperV {
		return []string{TraitTPM20, TraitHyperVGen2}
	}
	t := []string{versionTraits[s.Version], modelTraits[s.Model], modeTraits[s.SecretSecurity]}
	slices.Sort(t)
	return t
}

// Capabilities are what a host can do, as its agent finds out.
type Capabilities struct {
	// Enabled is the operator's switch for vTPMs on the host (enable-vtpm).
	// When false the host offers no TPM traits at all.
	Enabled bool
	// Versions are the TPM versions the hypervisor layer reports. Empty
	// means it does not report versions, and both are assumed.
	Versions []Version
	// Models are the device models the hypervisor layer reports.
	Models []Model
	// SecretSecurity are the modes the operator enables. Nil means all three.
	SecretSecurity []SecretSecurity
	// HyperVGen2 is set on a Hyper-V host that runs Generation 2 VMs.
	HyperVGen2 bool
}

// HostTraits are the traits a host with these capabilities offers. Values
// the hypervisor reports that vtpmd does not know give no trait.
func HostTraits(c Capabilities) TraitSet {
	if !c.Enabled {
		return TraitSet{}
	}
	var t []string
	versions := c.Versions
	if len(versions) == 0 {
		versions = []Version{V12, V20}
	}
	for _, v := range versions {
		t = appendKnown(t, versionTraits[v])
	}
	for _, m := range c.Models {
		t = appendKnown(t, modelTraits[m])
	}
	modes := c.SecretSecurity
	if modes == nil {
		modes = []SecretSecurity{User, HostMode, Deployment}
	}
	for _, m := range modes {
		t = appendKnown(t, modeTraits[m])
	}
	if c.HyperVGen2 {
		t = append(t, TraitHyperVGen2)
	}
	return NewTraitSet(t...)
}

func appendKnown(t []string, trait string) []string {
	if trait == "" {
		return t
	}
	return append(t, trait)
}

// TraitSet is an immutable set of traits, kept sorted so that membership is
// a binary search and placement over many hosts stays cheap.
type TraitSet struct{ sorted []string }

// NewTraitSet builds a set; duplicates and empty names are dropped.
func NewTraitSet(traits ...string) TraitSet {
	s := slices.Clone(traits)
	slices.Sort(s)
	s = slices.Compact(s)
	if len(s) > 0 && s[0] == "" {
		s = s[1:]
	}
	return TraitSet{s}
}

// Has reports whether trait is in the set.
func (s TraitSet) Has(trait string) bool {
	_, ok := slices.BinarySearch(s.sorted, trait)
	return ok
}

// Missing returns the traits of want that s lacks, in want's order.
func (s TraitSet) Missing(want []string) []string {
	var m []string
	for _, t := range want {
		if !s.Has(t) {
			m = append(m, t)
		}
	}
	return m
}

// HasAll reports whether every trait of want is in the set.
func (s TraitSet) HasAll(want []string) bool {
	for _, t := range want {
		if !s.Has(t) {
			return false
		}
	}
	return true
}

// List returns the traits, sorted; the caller must not modify it.
func (s TraitSet) List() []string {
	if s.sorted == nil {
		return []string{}
	}
	return s.sorted
}

// Len is the number of traits.
func (s TraitSet) Len() int { return len(s.sorted) }

// MarshalJSON encodes the set as a sorted JSON array.
func (s TraitSet) MarshalJSON() ([]byte, error) { return json.Marshal(s.List()) }

// UnmarshalJSON decodes a JSON array of trait names.
func (s *TraitSet) UnmarshalJSON(b []byte) error {
	var l []string
	if err := json.Unmarshal(b, &l); err != nil {
		return err
	}
	*s = NewTraitSet(l...)
	return nil
}
