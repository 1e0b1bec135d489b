package libvirt

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/spec"
)

var _ agent.Resizer = (*Backend)(nil)

// asideRoot holds, under StateRoot (emulator mode), libvirt's state
// directories of the vTPMs whose resize to a new TPM awaits confirm or
// revert: <StateRoot>/.resize/<uuid>/, the old TPM exactly as it was,
// where libvirt never looks (it keeps a domain's TPM at <StateRoot>/<uuid>)
// and on the same file system, so that setting aside and putting back are
// one rename each. Drift skips it. In external mode the swtpm runtime
// keeps the old TPM (swtpmhost.Runtime.AsideDir).
const asideRoot = ".resize"

// asideDir is where SetAside keeps vTPM id's old TPM.
func (b *Backend) asideDir(id string) string {
	if b.cfg.Mode == External {
		return b.cfg.Swtpm.AsideDir(id)
	}
	return filepath.Join(b.cfg.StateRoot, asideRoot, id)
}

// SetAside implements agent.Resizer: the guest is powered off (Nova's
// resize is cold) and vtpmd's swtpm stopped (external mode), and the old
// TPM's state is moved aside, served by nothing, so that the next Ensure
// makes the new TPM in its place: vtpmd's state directory in external mode
// (the swtpm runtime's SetAside), libvirt's whole state directory of the
// domain in emulator mode, so that libvirt finds no TPM of either version
// for it. In emulator mode the instance's libvirt secrets other than the
// record's (the old TPM's, kept defined with secret security host) are
// undefined too: libvirt holds one secret per usage, and the new TPM's
// takes it. Once a state is aside the old TPM is never touched again.
func (b *Backend) SetAside(ctx context.Context, v agent.VTPM) error {
	if b.cfg.Mode == Emulator {
		lv, err := b.conn()
		if err != nil {
			return err
		}
		if err := b.undefineOtherSecrets(lv, v); err != nil {
			return err
		}
	}
	aside := b.asideDir(v.InstanceID)
	if ok, err := exists(aside); err != nil || ok {
		return err
	}
	if err := b.Stop(ctx, v); err != nil {
		return err
	}
	if b.cfg.Mode == External {
		return b.cfg.Swtpm.SetAside(ctx, v.InstanceID)
	}
	dir := b.stateDir(v.InstanceID)
	if ok, err := exists(dir); err != nil || !ok {
		return err // no state to keep: the old TPM was never made
	}
	if err := os.MkdirAll(filepath.Dir(aside), 0o700); err != nil {
		return err
	}
	if err := os.Rename(dir, aside); err != nil {
		return fmt.Errorf("setting the state of %s aside: %w", v.InstanceID, err)
	}
	return b.syncRoots()
}

// Restore implements agent.Resizer: the guest is powered off, the new
// TPM's state removed and the old one put back where the mode keeps it.
// In emulator mode the libvirt secrets of the instance other than the old
// TPM's (the new TPM's) are undefined, and with secret security host the
// old TPM's is defined again, persistent, with its value, as an import
// leaves it, so that libvirt can start the guest on its own. With no
// state aside the state is in place already: only the secrets are set.
func (b *Backend) Restore(ctx context.Context, v agent.VTPM, secret func() ([]byte, error)) error {
	aside := b.asideDir(v.InstanceID)
	ok, err := exists(aside)
	if err != nil {
		return err
	}
	if ok {
		if err := b.Stop(ctx, v); err != nil {
			return err
		}
		if err := b.putBack(ctx, v.InstanceID, aside); err != nil {
			return err
		}
	}
	if b.cfg.Mode == External {
		return nil
	}
	lv, err := b.conn()
	if err != nil {
		return err
	}
	if err := b.undefineOtherSecrets(lv, v); err != nil {
		return err
	}
	if v.Spec.SecretSecurity != spec.HostMode {
		return nil
	}
	payload, err := secret()
	if err != nil {
		return fmt.Errorf("reading the secret of the old TPM of %s: %w", v.InstanceID, err)
	}
	return b.defineSecret(lv, v, payload, false)
}

// putBack replaces vTPM id's state with the one set aside at aside.
func (b *Backend) putBack(ctx context.Context, id, aside string) error {
	if b.cfg.Mode == External {
		return b.cfg.Swtpm.Restore(ctx, id)
	}
	dir := b.stateDir(id)
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing the new TPM of %s: %w", id, err)
	}
	if err := os.Rename(aside, dir); err != nil {
		return fmt.Errorf("putting the old state of %s back: %w", id, err)
	}
	return b.syncRoots()
}

// Discard implements agent.Resizer: the old TPM's state set aside goes,
// and (emulator mode) any libvirt secret of the instance but the new
// TPM's.
func (b *Backend) Discard(ctx context.Context, v agent.VTPM) error {
	if b.cfg.Mode == External {
		return b.cfg.Swtpm.Discard(ctx, v.InstanceID)
	}
	if err := os.RemoveAll(b.asideDir(v.InstanceID)); err != nil {
		return fmt.Errorf("removing the old state of %s: %w", v.InstanceID, err)
	}
	lv, err := b.conn()
	if err != nil {
		return err
	}
	return b.undefineOtherSecrets(lv, v)
}

// undefineOtherSecrets undefines the libvirt vTPM secrets of v's instance
// (usage vtpm, named by the instance id, as defineSecret makes them) other
// than v's own.
func (b *Backend) undefineOtherSecrets(lv *golibvirt.Libvirt, v agent.VTPM) error {
	all, _, err := lv.ConnectListAllSecrets(1, 0)
	if err != nil {
		return err
	}
	for _, s := range all {
		id := uuid.UUID(s.UUID).String()
		if s.UsageType != int32(golibvirt.SecretUsageTypeVtpm) || s.UsageID != v.InstanceID || id == v.SecretID {
			continue
		}
		if err := b.undefineSecret(lv, id); err != nil {
			return err
		}
	}
	return nil
}

// syncRoots makes a rename between StateRoot and the aside directory
// durable.
func (b *Backend) syncRoots() error {
	if err := atomicfile.SyncDir(filepath.Join(b.cfg.StateRoot, asideRoot)); err != nil {
		return err
	}
	return atomicfile.SyncDir(b.cfg.StateRoot)
}
