package libvirt

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/bundle"
	"github.com/vtpmd/vtpmd/internal/spec"
)

var _ agent.Exporter = (*Backend)(nil)

// Export implements agent.Exporter: the state files of v's TPM, copied by
// the host's swtpm runtime (swtpmhost.Runtime.Export) from where the
// mode keeps them: libvirt's state directory in emulator mode, vtpmd's in
// external mode. Either way they are swtpm's files, encrypted with the
// vTPM's secret as at rest.
func (b *Backend) Export(ctx context.Context, v agent.VTPM) ([]bundle.File, error) {
	return b.cfg.Swtpm.Export(ctx, b.tpmState(v))
}

// Import implements agent.Exporter: the runtime proves files to be v's
// TPM and puts them in place of its state (swtpmhost.Runtime.Import),
// owned by the user swtpm runs as; then the host holds what the mode
// needs to run the vTPM. In external mode that is all: vtpmd's swtpm
// serves the state. In emulator mode the state is in libvirt's state
// directory for the domain whose UUID is the instance id, which must not
// run (its swtpm holds the state), and with secret security host the
// libvirt secret is defined, persistent, with its value, as a start of
// the guest leaves it, so that libvirt can start the guest on its own;
// with user and deployment it is defined only for each start, as always.
func (b *Backend) Import(ctx context.Context, v agent.VTPM, secret []byte, files []bundle.File, eks []agent.EK) error {
	if b.cfg.Mode == External {
		return b.cfg.Swtpm.Import(ctx, v, secret, files, eks, b.tpmState(v))
	}
	lv, err := b.conn()
	if err != nil {
		return err
	}
	if err := b.notRunning(lv, v); err != nil {
		return err
	}
	if err := b.makeStateDir(v); err != nil {
		return err
	}
	if err := b.cfg.Swtpm.Import(ctx, v, secret, files, eks, b.tpmState(v)); err != nil {
		return err
	}
	if v.Spec.SecretSecurity == spec.HostMode {
		return b.defineSecret(lv, v, secret, false)
	}
	return nil
}

// tpmState is the directory of v's swtpm state.
func (b *Backend) tpmState(v agent.VTPM) string {
	if b.cfg.Mode == External {
		return b.cfg.Swtpm.Dir(v.InstanceID)
	}
	return filepath.Join(b.stateDir(v.InstanceID), tpmDir(v.Spec.Version))
}

// makeStateDir makes libvirt's state directory of v (emulator mode).
// libvirt's swtpm runs as swtpm_user: the directories above its state
// must be traversable, as libvirt makes them (0711).
func (b *Backend) makeStateDir(v agent.VTPM) error {
	for _, d := range []string{b.cfg.StateRoot, b.stateDir(v.InstanceID)} {
		if err := os.Mkdir(d, 0o711); err != nil && !os.IsExist(err) {
			return fmt.Errorf("creating %s: %w", d, err)
		}
	}
	return nil
}

// notRunning fails when the guest whose UUID is v's instance id runs: in
// emulator mode libvirt's swtpm serves its state meanwhile. An instance id
// that is no UUID names no guest.
func (b *Backend) notRunning(lv *golibvirt.Libvirt, v agent.VTPM) error {
	id, err := uuid.Parse(v.InstanceID)
	if err != nil {
		return nil
	}
	dom, err := lv.DomainLookupByUUID(golibvirt.UUID(id))
	if golibvirt.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	state, _, err := lv.DomainGetState(dom, 0)
	if err != nil {
		return err
	}
	if golibvirt.DomainState(state) != golibvirt.DomainShutoff {
		return fmt.Errorf("guest %s runs, and libvirt's swtpm with it: its vTPM state is replaced only while it is shut off", dom.Name)
	}
	return nil
}
