package libvirt

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
)

// Drift compares libvirt with the records of this host's vTPMs: libvirt
// secrets of usage vtpm and TPM state directories that no record refers to,
// records attached to a domain that is gone, and manufactured records whose
// state is gone. With repair it deletes the orphans (never a state whose
// domain is still defined); records are never touched. libvirt is read
// before the records, as a record always exists before its libvirt objects.
func (b *Backend) Drift(ctx context.Context, records func(context.Context) ([]agent.VTPM, error), repair bool) ([]api.Finding, error) {
	lv, err := b.conn()
	if err != nil {
		return nil, err
	}
	all, _, err := lv.ConnectListAllSecrets(1, 0)
	if err != nil {
		return nil, err
	}
	doms, _, err := lv.ConnectListAllDomains(1, 0)
	if err != nil {
		return nil, err
	}
	var entries []os.DirEntry
	if b.cfg.Mode == Emulator {
		if entries, err = os.ReadDir(b.cfg.StateRoot); err != nil && !os.IsNotExist(err) {
			return nil, err
		}
	}
	vs, err := records(ctx)
	if err != nil {
		return nil, err
	}
	secrets := map[string]bool{}
	ids := map[string]bool{}
	for _, v := range vs {
		secrets[v.SecretID] = true
		ids[v.InstanceID] = true
	}
	findings := []api.Finding{}
	for _, s := range all {
		id := uuid.UUID(s.UUID).String()
		if s.UsageType != int32(golibvirt.SecretUsageTypeVtpm) || secrets[id] {
			continue
		}
		f := api.Finding{Kind: "orphan_secret", Object: id, Detail: "libvirt vTPM secret (usage " + s.UsageID + ") that no vTPM refers to"}
		if repair {
			if err := b.undefineSecret(lv, id); err != nil {
				return nil, err
			}
			f.Deleted = true
		}
		findings = append(findings, f)
	}

	defined := map[string]string{} // UUID → name
	for _, d := range doms {
		defined[uuid.UUID(d.UUID).String()] = d.Name
	}
	for _, e := range entries {
		if !e.IsDir() || ids[e.Name()] || strings.HasPrefix(e.Name(), ".") { // .resize: the old TPMs of pending resizes
			continue
		}
		path := filepath.Join(b.cfg.StateRoot, e.Name())
		f := api.Finding{Kind: "orphan_state", Object: path, Detail: "TPM state that no vTPM refers to"}
		if name, ok := defined[e.Name()]; ok {
			f.Detail += fmt.Sprintf("; domain %s still uses it, so it is never deleted here", name)
		} else if repair {
			if err := os.RemoveAll(path); err != nil {
				return nil, err
			}
			f.Deleted = true
		}
		findings = append(findings, f)
	}

	names := map[string]bool{}
	for _, name := range defined {
		names[name] = true
	}
	for _, v := range vs {
		if v.Domain != "" && !names[v.Domain] {
			findings = append(findings, api.Finding{Kind: "missing_domain", Object: v.Domain, InstanceID: v.InstanceID,
				Detail: "the vTPM is attached to a domain that is not defined"})
		}
		if !v.Manufactured || v.Desired == agent.DesiredDeleted {
			continue
		}
		state := filepath.Join(b.stateDir(v.InstanceID), tpmDir(v.Spec.Version))
		if b.cfg.Mode == External {
			state = b.cfg.Swtpm.Dir(v.InstanceID)
		}
		if ok, err := exists(filepath.Join(state, swtpmhost.IdentityFile)); err != nil {
			return nil, err
		} else if !ok {
			findings = append(findings, api.Finding{Kind: "missing_state", Object: state, InstanceID: v.InstanceID,
				Detail: "the vTPM was manufactured but its state is gone"})
		}
	}
	return findings, nil
}
