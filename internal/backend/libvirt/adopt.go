package libvirt

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

var _ agent.Adopter = (*Backend)(nil)

// Adopt implements agent.Adopter in emulator mode, the mode Nova's vTPMs
// are in, and which keeps a vTPM exactly as Nova does: the domain's UUID
// is the instance id, libvirt keeps the state in StateRoot/<uuid>/tpm2,
// and the domain's <encryption secret=…> names the libvirt secret whose
// UUID is the key-manager secret's. So a Nova vTPM needs nothing moved or
// renamed to be one of this backend's: Adopt checks that it is one, opens
// a copy of its state with the secret and records its identity beside the
// state (swtpmhost.Runtime.Identify), after which Ensure finds it
// manufactured. The guest may be running or shut off.
//
// Refusals: domain_not_found; no_vtpm (no TPM, not an encrypted emulator
// TPM 2.0, or a domain UUID other than the instance id);
// vtpm_state_not_found (the guest never started, so libvirt never ran
// swtpm_setup); wrong_secret (the state does not open with the secret, or
// the domain names another); not_supported (external mode, vTPM
// disabled); and the key manager's, through secret.
func (b *Backend) Adopt(ctx context.Context, ask agent.AdoptionAsk, secret func(id string) ([]byte, error)) (agent.Adoption, error) {
	refuse := func(r *refusal.Error) (agent.Adoption, error) { return agent.Adoption{Refusal: r}, nil }
	switch {
	case !b.cfg.EnableVTPM:
		return refuse(refusal.Conflict(api.CodeNotSupported, "vTPM is disabled on this host (enable-vtpm)."))
	case b.cfg.Mode != Emulator:
		return refuse(refusal.Conflict(api.CodeNotSupported, "This host runs the libvirt backend in external mode; Nova's vTPMs are libvirt's own (emulator mode)."))
	}
	lv, err := b.conn()
	if err != nil {
		return agent.Adoption{}, err
	}
	dom, err := lv.DomainLookupByName(ask.Domain)
	if golibvirt.IsNotFound(err) {
		return refuse(refusal.NotFound(api.CodeDomainNotFound, "No libvirt domain named "+refusal.Quote(ask.Domain)+" on this host."))
	}
	if err != nil {
		return agent.Adoption{}, err
	}
	xml, err := lv.DomainGetXMLDesc(dom, golibvirt.DomainXMLInactive)
	if err != nil {
		return agent.Adoption{}, err
	}
	sp, secretID, r := novaTPM(xml)
	if r != nil {
		return refuse(r)
	}
	if got := uuid.UUID(dom.UUID).String(); got != ask.InstanceID {
		return refuse(refusal.Conflict(api.CodeNoVTPM, fmt.Sprintf("Domain %s has UUID %s, not the instance id %s: libvirt keeps a vTPM's state by domain UUID, and Nova gives a domain its instance's.",
			ask.Domain, got, ask.InstanceID)))
	}
	if ask.SecretID != "" && ask.SecretID != secretID {
		return refuse(refusal.Conflict(api.CodeWrongSecret, "The vTPM of domain "+ask.Domain+" is keyed by secret "+secretID+", not "+ask.SecretID+"."))
	}
	dir := filepath.Join(b.stateDir(ask.InstanceID), tpmDir(sp.Version))
	state, _, err := lv.DomainGetState(dom, 0)
	if err != nil {
		return agent.Adoption{}, err
	}
	// Nova's secret security: host keeps the libvirt secret defined (and
	// readable); user and deployment define it just for a start.
	sp.SecretSecurity = spec.User
	if s, err := lv.SecretLookupByUUID(golibvirt.UUID(uuid.MustParse(secretID))); err == nil {
		if xml, err := lv.SecretGetXMLDesc(s, 0); err == nil {
			var d libvirtxml.Secret
			if d.Unmarshal(xml) == nil && d.Ephemeral != "yes" && d.Private != "yes" {
				sp.SecretSecurity = spec.HostMode
			}
		}
	}
	payload, err := secret(secretID)
	if err != nil {
		return agent.Adoption{}, err
	}
	v := agent.VTPM{InstanceID: ask.InstanceID, Spec: sp, SecretID: secretID, Domain: ask.Domain}
	eks, err := b.cfg.Swtpm.Identify(ctx, v, payload, dir)
	switch {
	case errors.Is(err, swtpm.ErrNotManufactured):
		return refuse(refusal.Conflict(api.CodeVTPMStateNotFound, "The vTPM of domain "+ask.Domain+" has no state in "+dir+
			": libvirt makes it at the guest's first start."))
	case errors.Is(err, swtpm.ErrWrongSecret):
		return refuse(refusal.Conflict(api.CodeWrongSecret, "The vTPM state of domain "+ask.Domain+" does not open with secret "+secretID+"."))
	case err != nil:
		return agent.Adoption{}, err
	}
	b.log.Info("took over a vTPM", "instance", ask.InstanceID, "domain", ask.Domain, "secret", secretID)
	return agent.Adoption{Spec: sp, SecretID: secretID, Running: golibvirt.DomainState(state) == golibvirt.DomainRunning, EKs: eks}, nil
}

// novaTPM reads the vTPM Nova gives a domain from its XML: one TPM 2.0
// device with libvirt's emulator backend, its state encrypted with the
// libvirt secret it names; the spec and that secret's UUID, or a refusal.
func novaTPM(xml string) (spec.Spec, string, *refusal.Error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(xml); err != nil {
		return spec.Spec{}, "", refusal.Conflict(api.CodeNoVTPM, "The domain's XML does not parse: "+refusal.Truncate(err.Error()))
	}
	if d.Devices == nil || len(d.Devices.TPMs) == 0 {
		return spec.Spec{}, "", refusal.Conflict(api.CodeNoVTPM, "Domain "+d.Name+" has no TPM device.")
	}
	t := d.Devices.TPMs[0]
	if len(d.Devices.TPMs) > 1 || t.Backend == nil || t.Backend.Emulator == nil {
		return spec.Spec{}, "", refusal.Conflict(api.CodeNoVTPM, "The TPM of domain "+d.Name+" is not one libvirt emulates (what Nova makes).")
	}
	e := t.Backend.Emulator
	if e.Encryption == nil || e.Encryption.Secret == "" {
		return spec.Spec{}, "", refusal.Conflict(api.CodeNoVTPM, "The vTPM state of domain "+d.Name+" is not encrypted; vtpmd keeps none unencrypted.")
	}
	id, err := uuid.Parse(e.Encryption.Secret)
	if err != nil {
		return spec.Spec{}, "", refusal.Conflict(api.CodeNoVTPM, "The vTPM of domain "+d.Name+" names a secret that is not a UUID.")
	}
	if e.Version != string(spec.V20) {
		return spec.Spec{}, "", refusal.Conflict(api.CodeNoVTPM, fmt.Sprintf("The vTPM of domain %s is TPM %q; vtpmd takes over TPM 2.0 only.", d.Name, e.Version))
	}
	model := spec.Model(t.Model)
	if model == "" {
		model = spec.TIS
	}
	if model != spec.TIS && model != spec.CRB {
		return spec.Spec{}, "", refusal.Conflict(api.CodeNoVTPM, "The vTPM of domain "+d.Name+" has model "+refusal.Quote(t.Model)+", neither tpm-tis nor tpm-crb.")
	}
	return spec.Spec{Version: spec.V20, Model: model}, id.String(), nil
}
