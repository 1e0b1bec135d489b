package libvirt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// Ensure implements agent.Backend: the TPM is manufactured, attached to
// v.Domain (and to no other domain), and, when the vTPM is being started
// rather than checked again, the guest runs. A guest that shut itself down
// is not restarted behind its owner's back.
func (b *Backend) Ensure(ctx context.Context, v agent.VTPM, secret []byte) ([]agent.EK, error) {
	if !b.cfg.EnableVTPM {
		return nil, errors.New("vTPM is disabled on this host (enable-vtpm)")
	}
	if v.Spec.SecretSecurity != "" && b.cfg.SecretSecurity != nil && !slices.Contains(b.cfg.SecretSecurity, v.Spec.SecretSecurity) {
		return nil, fmt.Errorf("secret security %q is not offered on this host", v.Spec.SecretSecurity)
	}
	lv, err := b.conn()
	if err != nil {
		return nil, err
	}
	var eks []agent.EK
	if b.cfg.Mode == External {
		eks, err = b.cfg.Swtpm.Ensure(ctx, v, secret)
	} else {
		if err := b.makeStateDir(v); err != nil {
			return nil, err
		}
		eks, err = b.cfg.Swtpm.Manufacture(ctx, v, secret, b.tpmState(v))
	}
	if err != nil {
		return nil, err
	}
	// A settled vTPM is only checked, not searched for in every domain:
	// a pass over all domains per vTPM and pass would not scale.
	if !v.Active {
		if err := b.detachOthers(lv, v); err != nil {
			return nil, err
		}
	}
	if v.Domain == "" {
		return eks, nil
	}
	dom, err := b.domain(lv, v)
	if err != nil {
		return nil, err
	}
	if err := b.attach(lv, dom, v); err != nil {
		return nil, err
	}
	if !v.Active {
		if err := b.startGuest(lv, dom, v, secret); err != nil {
			return nil, err
		}
	}
	return eks, b.checkConnected(lv, dom, v)
}

// checkConnected fails when, in external mode, the guest runs with this
// vTPM but is not connected to vtpmd's swtpm: the swtpm it connected to at
// its start is gone (vtpmd or swtpm restarted), and QEMU does not
// reconnect, so the guest's TPM fails until the guest is started again.
// A swtpm seen serving its guest once is not checked again.
func (b *Backend) checkConnected(lv *golibvirt.Libvirt, dom golibvirt.Domain, v agent.VTPM) error {
	if b.cfg.Mode != External {
		return nil
	}
	if state, _, err := lv.DomainGetState(dom, 0); err != nil || golibvirt.DomainState(state) != golibvirt.DomainRunning {
		return err
	}
	pid := b.cfg.Swtpm.Running(v.InstanceID)
	b.mu.Lock()
	seen := pid != 0 && b.serving[v.InstanceID] == pid
	b.mu.Unlock()
	if seen {
		return nil
	}
	ok, err := swtpm.Connected(b.cfg.Swtpm.Sockets(v.InstanceID).Ctrl)
	if err != nil {
		return err
	}
	if !ok {
		// A guest that was running when the vTPM was attached gets it at
		// its next start; until then there is nothing to connect.
		live, err := lv.DomainGetXMLDesc(dom, 0)
		if err != nil || !b.uses(live, v) {
			return err
		}
		return fmt.Errorf("guest %s runs but is not connected to its vTPM: the swtpm it started with is gone (vtpmd or swtpm restarted) and QEMU does not reconnect; stop and start the instance to give the guest its TPM back", v.Domain)
	}
	b.mu.Lock()
	b.serving[v.InstanceID] = pid
	b.mu.Unlock()
	return nil
}

// Stop implements agent.Backend: the guest is powered off and, in external
// mode, vtpmd's swtpm stopped; the TPM state stays.
func (b *Backend) Stop(ctx context.Context, v agent.VTPM) error {
	lv, err := b.conn()
	if err != nil {
		return err
	}
	if err := b.detachOthers(lv, v); err != nil {
		return err
	}
	if v.Domain != "" {
		dom, err := lv.DomainLookupByName(v.Domain)
		switch {
		case golibvirt.IsNotFound(err):
		case err != nil:
			return err
		default:
			if err := b.stopGuest(lv, dom); err != nil {
				return err
			}
		}
	}
	if b.cfg.Mode == External {
		return b.cfg.Swtpm.Stop(ctx, v.InstanceID)
	}
	return nil
}

// Destroy implements agent.Backend: the guest is stopped and loses its TPM
// device (the rest of its definition stays), the libvirt secret is
// undefined and the state removed, with any old TPM a resize set aside.
func (b *Backend) Destroy(ctx context.Context, v agent.VTPM) error {
	lv, err := b.conn()
	if err != nil {
		return err
	}
	detached := v
	detached.Domain = ""
	if err := b.detachOthers(lv, detached); err != nil {
		return err
	}
	if err := b.undefineSecret(lv, v.SecretID); err != nil {
		return err
	}
	if b.cfg.Mode == External {
		b.mu.Lock()
		delete(b.serving, v.InstanceID)
		b.mu.Unlock()
		return b.cfg.Swtpm.Remove(ctx, v.InstanceID)
	}
	for _, dir := range []string{b.stateDir(v.InstanceID), b.asideDir(v.InstanceID)} {
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("removing the state of %s: %w", v.InstanceID, err)
		}
	}
	return nil
}

// domain finds v's domain; in emulator mode its UUID must be the instance
// id, since libvirt keeps the TPM state by domain UUID.
func (b *Backend) domain(lv *golibvirt.Libvirt, v agent.VTPM) (golibvirt.Domain, error) {
	dom, err := lv.DomainLookupByName(v.Domain)
	if golibvirt.IsNotFound(err) {
		return dom, fmt.Errorf("no libvirt domain named %q on this host", v.Domain)
	}
	if err != nil {
		return dom, err
	}
	if b.cfg.Mode == Emulator && uuid.UUID(dom.UUID).String() != v.InstanceID {
		return dom, fmt.Errorf("domain %q has UUID %s, but in emulator mode a vTPM attaches only to the domain whose UUID is its instance id (%s): libvirt keeps TPM state by domain UUID",
			v.Domain, uuid.UUID(dom.UUID), v.InstanceID)
	}
	return dom, nil
}

// device is the TPM device v's domain gets.
func (b *Backend) device(v agent.VTPM) *libvirtxml.DomainTPM {
	if b.cfg.Mode == External {
		return TPMDevice(v.Spec, External, "", b.cfg.Swtpm.Sockets(v.InstanceID).Ctrl)
	}
	return TPMDevice(v.Spec, Emulator, v.SecretID, "")
}

// attach puts v's TPM device into dom's persistent definition, keeping the
// rest, unless it is there already. A running guest sees the change at its
// next start.
func (b *Backend) attach(lv *golibvirt.Libvirt, dom golibvirt.Domain, v agent.VTPM) error {
	xml, err := lv.DomainGetXMLDesc(dom, golibvirt.DomainXMLInactive|golibvirt.DomainXMLSecure)
	if err != nil {
		return err
	}
	updated, err := AttachTPM(xml, b.device(v))
	if err != nil {
		return fmt.Errorf("attaching to %s: %w", v.Domain, err)
	}
	if updated == xml {
		return nil
	}
	if _, err := lv.DomainDefineXML(updated); err != nil {
		return fmt.Errorf("redefining %s with its vTPM: %w", v.Domain, err)
	}
	b.log.Info("attached vTPM", "instance", v.InstanceID, "domain", v.Domain, "mode", b.cfg.Mode)
	return nil
}

// detachOthers removes v's TPM from every domain other than v.Domain: a
// vTPM is in at most one guest. A guest is powered off only if it runs
// with v's TPM; the definition is read again just before it is changed.
// Both matter where two hosts' agents share one libvirtd (as the tests run
// two external-mode hosts): a cold migration's source, removing its copy,
// may read the definition just before the target gives the guest its own
// swtpm and starts it, and must neither stop that guest (it runs with the
// target's TPM, as its live definition says) nor put back what it read. A
// domain listed that is gone by the time it is read (another guest
// live-migrated away meanwhile, its definition undefined here by libvirt,
// as the agent's concurrent transfers do) is skipped.
func (b *Backend) detachOthers(lv *golibvirt.Libvirt, v agent.VTPM) error {
	doms, _, err := lv.ConnectListAllDomains(1, 0)
	if err != nil {
		return err
	}
	for _, dom := range doms {
		if dom.Name == v.Domain {
			continue
		}
		if err := b.detachFrom(lv, dom, v); err != nil && !golibvirt.IsNotFound(err) {
			return err
		}
	}
	return nil
}

// detachFrom removes v's TPM from dom, if dom holds it (detachOthers).
func (b *Backend) detachFrom(lv *golibvirt.Libvirt, dom golibvirt.Domain, v agent.VTPM) error {
	xml, err := lv.DomainGetXMLDesc(dom, golibvirt.DomainXMLInactive|golibvirt.DomainXMLSecure)
	if err != nil || !b.uses(xml, v) {
		return err
	}
	if state, reason, err := lv.DomainGetState(dom, 0); err == nil && golibvirt.DomainState(state) == golibvirt.DomainShutoff &&
		golibvirt.DomainShutoffReason(reason) == golibvirt.DomainShutoffMigrated {
		// The copy a live migration left behind, the guest running on
		// another host: libvirt undefines it at the migration's end
		// (VIR_MIGRATE_UNDEFINE_SOURCE, as the agent asks), unless its
		// caller went away before then. Its NVRAM may be the guest's
		// on shared storage: kept.
		if err := lv.DomainUndefineFlags(dom, golibvirt.DomainUndefineKeepNvram); err != nil {
			return fmt.Errorf("undefining %s, left behind by its live migration: %w", dom.Name, err)
		}
		b.log.Info("undefined the copy of a guest that live-migrated away", "instance", v.InstanceID, "domain", dom.Name)
		return nil
	}
	if err := b.stopIfRunningWith(lv, dom, v); err != nil {
		return err
	}
	if xml, err = lv.DomainGetXMLDesc(dom, golibvirt.DomainXMLInactive|golibvirt.DomainXMLSecure); err != nil || !b.uses(xml, v) {
		return err
	}
	updated, _, err := DetachTPM(xml)
	if err != nil {
		return err
	}
	if _, err := lv.DomainDefineXML(updated); err != nil {
		return fmt.Errorf("redefining %s without its vTPM: %w", dom.Name, err)
	}
	b.log.Info("detached vTPM", "instance", v.InstanceID, "domain", dom.Name)
	return nil
}

// uses reports whether domain XML holds v's TPM: its secret (emulator) or
// its control socket (external).
func (b *Backend) uses(xml string, v agent.VTPM) bool {
	var d libvirtxml.Domain
	if err := d.Unmarshal(xml); err != nil || d.Devices == nil {
		return false
	}
	for _, t := range d.Devices.TPMs {
		switch be := t.Backend; {
		case be == nil:
		case be.Emulator != nil && be.Emulator.Encryption != nil:
			if be.Emulator.Encryption.Secret == v.SecretID {
				return true
			}
		case be.External != nil && be.External.Source != nil && be.External.Source.UNIX != nil:
			if be.External.Source.UNIX.Path == b.cfg.Swtpm.Sockets(v.InstanceID).Ctrl {
				return true
			}
		}
	}
	return false
}

// startGuest starts dom unless it runs. In emulator mode libvirt needs the
// vTPM secret while it starts swtpm: for secret security user and
// deployment it is defined ephemeral and private just for the start and
// undefined once the guest runs (Nova does the same); for host it is
// persistent and kept.
func (b *Backend) startGuest(lv *golibvirt.Libvirt, dom golibvirt.Domain, v agent.VTPM, secret []byte) error {
	state, _, err := lv.DomainGetState(dom, 0)
	if err != nil {
		return err
	}
	if golibvirt.DomainState(state) == golibvirt.DomainRunning {
		return nil
	}
	if b.cfg.Mode == Emulator {
		keep := v.Spec.SecretSecurity == spec.HostMode
		if err := b.defineSecret(lv, v, secret, !keep); err != nil {
			return err
		}
		if !keep {
			defer b.undefineSecret(lv, v.SecretID)
		}
	}
	if err := lv.DomainCreate(dom); err != nil {
		return fmt.Errorf("starting guest %s: %w", dom.Name, err)
	}
	b.log.Info("started guest", "instance", v.InstanceID, "domain", dom.Name)
	return nil
}

// stopIfRunningWith powers dom off if it runs with v's TPM (its live
// definition holds it); a guest running with another TPM, or with v's
// attached only to its definition since it started, keeps running.
func (b *Backend) stopIfRunningWith(lv *golibvirt.Libvirt, dom golibvirt.Domain, v agent.VTPM) error {
	state, _, err := lv.DomainGetState(dom, 0)
	if err != nil || golibvirt.DomainState(state) == golibvirt.DomainShutoff {
		return err
	}
	live, err := lv.DomainGetXMLDesc(dom, golibvirt.DomainXMLSecure)
	if err != nil || !b.uses(live, v) {
		return err
	}
	return b.stopGuest(lv, dom)
}

// stopGuest powers dom off if it runs. The TPM state is swtpm's and stays.
func (b *Backend) stopGuest(lv *golibvirt.Libvirt, dom golibvirt.Domain) error {
	state, _, err := lv.DomainGetState(dom, 0)
	if err != nil {
		return err
	}
	if golibvirt.DomainState(state) == golibvirt.DomainShutoff {
		return nil
	}
	if err := lv.DomainDestroy(dom); err != nil {
		// The guest may have powered itself off meanwhile.
		if state, _, serr := lv.DomainGetState(dom, 0); serr == nil && golibvirt.DomainState(state) == golibvirt.DomainShutoff {
			return nil
		}
		return fmt.Errorf("stopping guest %s: %w", dom.Name, err)
	}
	return nil
}

// defineSecret gives libvirt v's secret under the key-manager secret's UUID,
// with usage type vtpm, as Nova does.
func (b *Backend) defineSecret(lv *golibvirt.Libvirt, v agent.VTPM, secret []byte, ephemeral bool) error {
	xml, err := SecretXML(v.SecretID, ephemeral, ephemeral, v.InstanceID)
	if err != nil {
		return err
	}
	s, err := lv.SecretDefineXML(xml, 0)
	if err != nil {
		return fmt.Errorf("defining the libvirt secret of %s: %w", v.InstanceID, err)
	}
	if err := lv.SecretSetValue(s, secret, 0); err != nil {
		lv.SecretUndefine(s)
		return fmt.Errorf("setting the libvirt secret of %s: %w", v.InstanceID, err)
	}
	return nil
}

// undefineSecret removes the libvirt secret id, if defined.
func (b *Backend) undefineSecret(lv *golibvirt.Libvirt, id string) error {
	u, err := uuid.Parse(id)
	if err != nil {
		return err
	}
	s, err := lv.SecretLookupByUUID(golibvirt.UUID(u))
	if isNoSecret(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := lv.SecretUndefine(s); err != nil && !isNoSecret(err) {
		return fmt.Errorf("undefining libvirt secret %s: %w", id, err)
	}
	return nil
}

func isNoSecret(err error) bool {
	var e golibvirt.Error
	return errors.As(err, &e) && e.Code == uint32(golibvirt.ErrNoSecret)
}
