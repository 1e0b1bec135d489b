package spec

import "github.com/vtpmd/vtpmd/api"

// Resolution is the wire form of a resolved request (s nil: no vTPM).
func Resolution(s *Spec) api.Resolution {
	r := api.Resolution{RequiredTraits: s.RequiredTraits()}
	if s == nil {
		return r
	}
	v := APISpec(*s)
	r.VTPM = &v
	return r
}

// APISpec is the wire form of s.
func APISpec(s Spec) api.VTPMSpec {
	v := api.VTPMSpec{Version: string(s.Version), SecretSecurity: string(s.SecretSecurity), Hypervisor: s.Hypervisor, Keys: s.Keys}
	if s.Model != "" {
		m := string(s.Model)
		v.Model = &m
	}
	return v
}

// FromAPI is the Spec whose wire form is v.
func FromAPI(v api.VTPMSpec) Spec {
	s := Spec{Version: Version(v.Version), SecretSecurity: SecretSecurity(v.SecretSecurity), Hypervisor: v.Hypervisor, Keys: v.Keys}
	if v.Model != nil {
		s.Model = Model(*v.Model)
	}
	return s
}

// APIError is the wire form of a refusal.
func (e *Error) APIError() api.Error { return api.Error{Code: e.Code, Message: e.Message} }
