package libvirt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	golibvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
)

var _ agent.LiveMigrator = (*Backend)(nil)

// liveFlags are how a guest is live-migrated, as Nova does it:
// peer-to-peer (the source libvirtd drives the migration to the
// destination's), its persistent definition moving with it.
const liveFlags = golibvirt.MigrateLive | golibvirt.MigratePeer2peer | golibvirt.MigratePersistDest | golibvirt.MigrateUndefineSource

// PrepareIncoming implements agent.LiveMigrator: this host makes ready to
// receive v's guest. In emulator mode libvirt starts the destination's
// swtpm itself, keyed by the libvirt secret, and QEMU hands it the state:
// the secret is defined here (kept, for secret security host, as Nova
// does; ephemeral and private, for user and deployment, until
// SettleIncoming or AbortIncoming), and v's identity recorded in the state
// directory libvirt will fill. In external mode vtpmd's swtpm is started
// on an empty state with v's identity, before QEMU connects to it.
func (b *Backend) PrepareIncoming(ctx context.Context, v agent.VTPM, secret []byte, eks []agent.EK) (agent.Incoming, error) {
	if b.cfg.MigrationURI == "" {
		return agent.Incoming{}, refusal.Conflict(api.CodeNotSupported, "This host takes no live migrations: its agent has no --libvirt-migration-uri.")
	}
	if !b.cfg.EnableVTPM {
		return agent.Incoming{}, errors.New("vTPM is disabled on this host (enable-vtpm)")
	}
	if v.Spec.SecretSecurity != "" && b.cfg.SecretSecurity != nil && !slices.Contains(b.cfg.SecretSecurity, v.Spec.SecretSecurity) {
		return agent.Incoming{}, fmt.Errorf("secret security %q is not offered on this host", v.Spec.SecretSecurity)
	}
	lv, err := b.conn()
	if err != nil {
		return agent.Incoming{}, err
	}
	if state, err := b.guestState(lv, v); err != nil || state == golibvirt.DomainRunning {
		if err == nil {
			err = fmt.Errorf("guest %s runs on this host already", v.Domain)
		}
		return agent.Incoming{}, err
	}
	in := agent.Incoming{URI: b.cfg.MigrationURI}
	if b.cfg.Mode == External {
		if err := b.cfg.Swtpm.Receive(ctx, v, secret, eks); err != nil {
			return agent.Incoming{}, err
		}
		in.TPMCtrl = b.cfg.Swtpm.Sockets(v.InstanceID).Ctrl
		return in, nil
	}
	for _, d := range []string{b.cfg.StateRoot, b.stateDir(v.InstanceID)} {
		if err := os.Mkdir(d, 0o711); err != nil && !os.IsExist(err) {
			return agent.Incoming{}, fmt.Errorf("creating %s: %w", d, err)
		}
	}
	if err := swtpmhost.RecordIdentity(filepath.Join(b.stateDir(v.InstanceID), tpmDir(v.Spec.Version)), eks); err != nil {
		return agent.Incoming{}, err
	}
	if err := b.defineSecret(lv, v, secret, v.Spec.SecretSecurity != spec.HostMode); err != nil {
		return agent.Incoming{}, err
	}
	return in, nil
}

// MigrateLive implements agent.LiveMigrator: libvirt migrates v's running
// guest to the host to describes, peer-to-peer, the TPM state in the
// migration stream (in external mode the guest connects there to the
// swtpm at to.TPMCtrl). It returns once the guest runs there; when it
// fails, libvirt resumes the guest here, with its TPM. When ctx ends
// first, libvirt's migration job is aborted (virDomainAbortJob): the
// migration fails, unless it was completing.
//
// Each migration has a libvirtd connection of its own: libvirtd serves at
// most max_client_requests calls of one connection at once (5 by
// default) and reads none of its next ones meanwhile, so migrations on
// the backend's shared connection, which the agent runs side by side,
// would hold up its every other call, and each other past five.
func (b *Backend) MigrateLive(ctx context.Context, v agent.VTPM, to agent.Incoming) error {
	lv, err := dial(b.cfg.Socket)
	if err != nil {
		return err
	}
	defer lv.Disconnect()
	dom, err := b.domain(lv, v)
	if err != nil {
		return err
	}
	if state, _, err := lv.DomainGetState(dom, 0); err != nil || golibvirt.DomainState(state) != golibvirt.DomainRunning {
		if err == nil {
			err = fmt.Errorf("guest %s is not running: a live migration moves a running guest", v.Domain)
		}
		return err
	}
	var params []golibvirt.TypedParam
	if b.cfg.Mode == External {
		// The guest's TPM there is the destination's swtpm, at its path.
		live, err := lv.DomainGetXMLDesc(dom, golibvirt.DomainXMLMigratable|golibvirt.DomainXMLSecure)
		if err != nil {
			return err
		}
		persistent, err := lv.DomainGetXMLDesc(dom, golibvirt.DomainXMLInactive|golibvirt.DomainXMLMigratable|golibvirt.DomainXMLSecure)
		if err != nil {
			return err
		}
		if live, err = retargetTPM(live, to.TPMCtrl); err != nil {
			return err
		}
		if persistent, err = retargetTPM(persistent, to.TPMCtrl); err != nil {
			return err
		}
		params = []golibvirt.TypedParam{
			{Field: golibvirt.MigrateParamDestXML, Value: *golibvirt.NewTypedParamValueString(live)},
			{Field: golibvirt.MigrateParamPersistXML, Value: *golibvirt.NewTypedParamValueString(persistent)},
		}
	}
	b.log.Info("live-migrating guest", "instance", v.InstanceID, "domain", v.Domain, "to", to.URI)
	done := make(chan struct{})
	aborted := make(chan error, 1)
	go func() {
		select {
		case <-done:
			close(aborted)
		case <-ctx.Done():
			b.log.Warn("aborting the live migration", "instance", v.InstanceID, "domain", v.Domain, "to", to.URI, "why", context.Cause(ctx))
			aborted <- lv.DomainAbortJob(dom)
		}
	}()
	_, err = lv.DomainMigratePerform3Params(dom, golibvirt.OptString{to.URI}, params, nil, liveFlags)
	close(done)
	if abortErr, ok := <-aborted; ok && err != nil {
		return fmt.Errorf("live-migrating guest %s to %s: aborted (%w; abort: %v)", v.Domain, to.URI, err, abortErr)
	}
	if err != nil {
		return fmt.Errorf("live-migrating guest %s to %s: %w", v.Domain, to.URI, err)
	}
	b.mu.Lock()
	delete(b.serving, v.InstanceID)
	b.mu.Unlock()
	return nil
}

// SettleIncoming implements agent.LiveMigrator: once the guest runs here,
// the libvirt secret of a vTPM whose secret security is user or
// deployment is undefined again (libvirt's swtpm holds the key it was
// started with); host mode keeps it, as Nova does.
func (b *Backend) SettleIncoming(ctx context.Context, v agent.VTPM) error {
	if b.cfg.Mode == External || v.Spec.SecretSecurity == spec.HostMode {
		return nil
	}
	lv, err := b.conn()
	if err != nil {
		return err
	}
	return b.undefineSecret(lv, v.SecretID)
}

// AbortIncoming implements agent.LiveMigrator: after a live migration to
// this host failed, what PrepareIncoming made goes (the libvirt secret,
// the state directory, vtpmd's swtpm). A guest that runs here is not
// touched: the migration landed (guest_runs_here). Nor is one still
// arriving (guest_arriving): libvirt is moving it, and finishes or fails.
func (b *Backend) AbortIncoming(ctx context.Context, v agent.VTPM) error {
	lv, err := b.conn()
	if err != nil {
		return err
	}
	switch state, err := b.guestState(lv, v); {
	case err != nil:
		return err
	case state == golibvirt.DomainRunning:
		return refusal.Conflict(api.CodeGuestRunsHere, fmt.Sprintf("Guest %s runs on this host: its live migration landed.", v.Domain))
	case state != golibvirt.DomainNostate && state != golibvirt.DomainShutoff:
		return refusal.Conflict(api.CodeGuestArriving, fmt.Sprintf("Guest %s is arriving on this host (libvirt state %d).", v.Domain, state))
	}
	if b.cfg.Mode == External {
		return b.cfg.Swtpm.Remove(ctx, v.InstanceID)
	}
	if err := b.undefineSecret(lv, v.SecretID); err != nil {
		return err
	}
	if err := os.RemoveAll(b.stateDir(v.InstanceID)); err != nil {
		return fmt.Errorf("removing the state of %s: %w", v.InstanceID, err)
	}
	return nil
}

// guestState is the state of v's guest on this host; DomainNostate
// when it has none here.
func (b *Backend) guestState(lv *golibvirt.Libvirt, v agent.VTPM) (golibvirt.DomainState, error) {
	dom, err := lv.DomainLookupByName(v.Domain)
	if golibvirt.IsNotFound(err) {
		return golibvirt.DomainNostate, nil
	}
	if err != nil {
		return 0, err
	}
	state, _, err := lv.DomainGetState(dom, 0)
	return golibvirt.DomainState(state), err
}

// retargetTPM returns domainXML with its external TPM's socket at ctrl,
// the rest (its alias, its address) as it was.
func retargetTPM(domainXML, ctrl string) (string, error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(domainXML); err != nil {
		return "", fmt.Errorf("parsing domain XML: %w", err)
	}
	if d.Devices == nil || len(d.Devices.TPMs) != 1 || d.Devices.TPMs[0].Backend == nil || d.Devices.TPMs[0].Backend.External == nil ||
		d.Devices.TPMs[0].Backend.External.Source == nil || d.Devices.TPMs[0].Backend.External.Source.UNIX == nil {
		return "", errors.New("the guest has no external TPM to move")
	}
	d.Devices.TPMs[0].Backend.External.Source.UNIX.Path = ctrl
	return d.Marshal()
}
