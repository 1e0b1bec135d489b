package vtpms

import (
	"context"
	"slices"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/backend/hyperv"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// HyperVOptions shape Hyper-V plans.
type HyperVOptions struct {
	// PublicURL is vtpmd's API as Hyper-V hosts reach it.
	PublicURL string
	// HGS is the Host Guardian Service's URL; "" for local key protectors.
	HGS string
}

// HyperVPlan is the PowerShell plan for the Hyper-V vTPM of instance id,
// for the VM vmName ("" is the instance id), after checking its keys
// again: they may have been deleted since it was created.
func (s *Service) HyperVPlan(ctx context.Context, c tenant.Caller, id, vmName string) (hyperv.Plan, error) {
	v, err := s.Get(ctx, c, id)
	if err != nil {
		return hyperv.Plan{}, err
	}
	if v.Spec.Hypervisor != spec.HyperV {
		return hyperv.Plan{}, refusal.Conflict(api.CodeNotHyperV, "This vTPM is not a Hyper-V vTPM (the image's hypervisor_type is not hyperv).")
	}
	if err := s.cfg.Secrets.CheckVTPMKeys(ctx, v.Project, v.Spec.Keys); err != nil {
		return hyperv.Plan{}, err
	}
	if vmName == "" {
		vmName = v.InstanceID
	}
	return hyperv.Plan{InstanceID: v.InstanceID, VMName: vmName, Host: v.Host, Server: s.cfg.HyperV.PublicURL,
		Keys: slices.Clone(v.Spec.Keys), HGS: s.cfg.HyperV.HGS}, nil
}
