package spec

import "github.com/vtpmd/vtpmd/api"

// Resolution is the wire form of a resolved request (s nil: no vTPM).
func Resolution(s *Spec) api.Resolution {
	r := api.Resolution{RequiredTraits: s.RequiredTraits()}
	if s == nil {
		return r
	}
	r.VTPM = &api.VTPMSpec{
		Version:        string(s.Version),
		SecretSecurity: string(s.SecretSecurity),
		Hypervisor:     s.Hypervisor,
		Keys:           s.Keys,
	}
	if s.Model != "" {
		m := string(s.Model)
		r.VTPM.Model = &m
	}
	return r
}

// APIError is the wire form of a refusal.
func (e *Error) APIError() api.Error { return api.Error{Code: e.Code, Message: e.Message} }
