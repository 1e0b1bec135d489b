package xen

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// Backend provisions each instance's vTPM as a Xen stub domain: a UUID
// registered with the VTPM manager's group, a 2 MiB disk, and the stub
// domain's and guest's configurations in xl and libvirt form. Starting
// domains is the toolstack's (xl create, or Nova's libvirt driver): no Xen
// runs here, so Ensure provisions and Stop has nothing to stop.
type Backend struct {
	layout  Layout
	manager Manager
	log     *slog.Logger
}

var _ agent.Backend = (*Backend)(nil)

// New makes the backend, creating the layout's directories.
func New(layout Layout, m Manager, log *slog.Logger) (*Backend, error) {
	layout = layout.withDefaults()
	for _, dir := range []string{layout.ImageDir, layout.ConfigDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Backend{layout: layout, manager: m, log: log}, nil
}

// Name implements agent.Backend.
func (b *Backend) Name() string { return "xen" }

// Capabilities: a vtpm stub domain is a TPM 1.2, seen by the guest through
// Xen's paravirtual front-end, which is TIS-like; CRB is not offered. Its
// keys are vtpmmgr's, sealed to the host's TPM: host secret security, the
// only mode offered.
func (b *Backend) Capabilities(ctx context.Context) (spec.Capabilities, error) {
	return spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V12}, Models: []spec.Model{spec.TIS},
		SecretSecurity: []spec.SecretSecurity{spec.HostMode}}, nil
}

// Ensure provisions v's stub domain, idempotently: a UUID already in its
// xl configuration is kept, an existing disk (the vTPM's NVRAM) is never
// rewritten. The secret is not used: vtpmmgr seals each vTPM's keys to the
// physical TPM. A stub domain's EK is made inside it, so there is none to
// report.
func (b *Backend) Ensure(ctx context.Context, v agent.VTPM, secret []byte) ([]agent.EK, error) {
	if v.Spec.Version != spec.V12 {
		return nil, fmt.Errorf("a Xen vtpm stub domain is a TPM 1.2; this vTPM asks for %s", v.Spec.Version)
	}
	xlPath, xmlPath, guestXL, guestXML := b.layout.Files(v.InstanceID)
	id, err := b.registeredUUID(xlPath)
	if err != nil {
		return nil, err
	}
	if id == uuid.Nil {
		if id, err = b.manager.Register(ctx, stubOwner(v.InstanceID)); err != nil {
			return nil, err
		}
	}
	d := b.layout.StubDomain(v.InstanceID, id)
	if err := makeImage(d.Image); err != nil {
		return nil, err
	}
	stubXML, err := d.LibvirtXML()
	if err != nil {
		return nil, err
	}
	devXML, err := d.GuestLibvirtXML()
	if err != nil {
		return nil, err
	}
	// The xl configuration goes last: it records the UUID, so a crash
	// before it leaves a registration Drift finds and can release.
	for _, f := range []struct {
		path string
		data []byte
	}{{xmlPath, stubXML}, {guestXL, d.GuestXL()}, {guestXML, devXML}, {xlPath, d.XL()}} {
		if err := atomicfile.Write(f.path, f.data, 0o644); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

// registeredUUID reads the vTPM UUID from an existing stub domain xl
// configuration; uuid.Nil when there is none.
func (b *Backend) registeredUUID(xlPath string) (uuid.UUID, error) {
	data, err := os.ReadFile(xlPath)
	if errors.Is(err, os.ErrNotExist) {
		return uuid.Nil, nil
	}
	if err != nil {
		return uuid.Nil, err
	}
	return vtpmUUID(data)
}

// vtpmUUID is the uuid= of a stub domain's vtpm setting.
func vtpmUUID(xl []byte) (uuid.UUID, error) {
	cfg, err := ParseXL(xl)
	if err != nil {
		return uuid.Nil, err
	}
	list, _ := cfg["vtpm"].([]string)
	for _, dev := range list {
		for _, kv := range strings.Split(dev, ",") {
			if v, ok := strings.CutPrefix(kv, "uuid="); ok {
				return uuid.Parse(v)
			}
		}
	}
	return uuid.Nil, errors.New("the stub domain's xl configuration has no vtpm uuid")
}

// makeImage creates a zero-filled (sparse) disk of ImageSize, keeping one
// that exists; one of another size is not the vTPM's and is refused.
func makeImage(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		info, err := os.Stat(path)
		if err == nil && info.Size() != ImageSize {
			err = fmt.Errorf("%s is %d bytes, not a %d-byte vTPM disk; not touching it", path, info.Size(), ImageSize)
		}
		return err
	}
	if err != nil {
		return err
	}
	if err := f.Truncate(ImageSize); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}

// Stop has nothing to stop here: the stub domain is the toolstack's to run.
func (b *Backend) Stop(ctx context.Context, v agent.VTPM) error { return nil }

// Destroy removes v's configurations and disk, then its UUID registration.
func (b *Backend) Destroy(ctx context.Context, v agent.VTPM) error {
	xlPath, xmlPath, guestXL, guestXML := b.layout.Files(v.InstanceID)
	id, err := b.registeredUUID(xlPath)
	if err != nil {
		return err
	}
	for _, p := range []string{xmlPath, guestXL, guestXML, b.layout.StubDomain(v.InstanceID, id).Image, xlPath} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if id == uuid.Nil {
		return nil
	}
	return b.manager.Release(ctx, id)
}

// stubOwner is the owner of the UUID of instanceID's stub domain.
func stubOwner(instanceID string) string { return "vtpm-" + instanceID }

// Sockets: a stub domain is reached through Xen, not a socket.
func (b *Backend) Sockets(string) api.Sockets { return api.Sockets{} }

// Drift compares the group's registrations and the stub domains' files
// with the records: a registered UUID no stub domain uses (a crash between
// registering and configuring), a stub domain without a record, a record
// without its stub domain. With repair, orphans are removed.
func (b *Backend) Drift(ctx context.Context, records func(context.Context) ([]agent.VTPM, error), repair bool) ([]api.Finding, error) {
	vs, err := records(ctx)
	if err != nil {
		return nil, err
	}
	known := map[string]bool{}
	for _, v := range vs {
		known[v.InstanceID] = true
	}
	used := map[uuid.UUID]bool{}
	out := []api.Finding{}
	configs, err := filepath.Glob(filepath.Join(b.layout.ConfigDir, "vtpm-*.cfg"))
	if err != nil {
		return nil, err
	}
	for _, path := range configs {
		instance, ok := strings.CutSuffix(strings.TrimPrefix(filepath.Base(path), "vtpm-"), ".cfg")
		if !ok || strings.HasSuffix(instance, ".guest") {
			continue
		}
		id, err := b.registeredUUID(path)
		if err != nil {
			return nil, err
		}
		used[id] = true
		if known[instance] {
			delete(known, instance)
			continue
		}
		f := api.Finding{Kind: "orphan_stub_domain", Object: path, InstanceID: instance, Detail: "vtpm stub domain (UUID " + id.String() + ") that no vTPM refers to"}
		if repair {
			if err := b.Destroy(ctx, agent.VTPM{InstanceID: instance}); err != nil {
				return nil, err
			}
			f.Deleted = true
		}
		out = append(out, f)
	}
	for instance := range known {
		xl, _, _, _ := b.layout.Files(instance)
		out = append(out, api.Finding{Kind: "missing_stub_domain", Object: xl, InstanceID: instance, Detail: "the vTPM's stub domain configuration is gone; the agent provisions it again"})
	}
	registered, err := b.manager.Registered(ctx)
	if err != nil {
		return nil, err
	}
	for _, r := range registered {
		if used[r.UUID] || !strings.HasPrefix(r.Owner, stubOwner("")) {
			continue // in use, or the UUID service's caller's
		}
		f := api.Finding{Kind: "orphan_uuid", Object: r.UUID.String(), InstanceID: strings.TrimPrefix(r.Owner, stubOwner("")),
			Detail: "vTPM UUID registered with the VTPM manager for a stub domain that was never written"}
		if repair {
			if err := b.manager.Release(ctx, r.UUID); err != nil {
				return nil, err
			}
			f.Deleted = true
		}
		out = append(out, f)
	}
	return out, nil
}
