// Package direct is the swtpm backend: vtpmd runs each vTPM itself, as a
// supervised swtpm process of the host's swtpm runtime (swtpmhost), for
// clients that attach to its sockets: tpm.sock (TPM commands) and
// tpm.sock.ctrl (control channel, for QEMU). It keeps the runtime's pool
// of manufactured TPMs for new vTPMs.
package direct

import (
	"context"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/bundle"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
)

// Backend runs vTPMs on the host's swtpm runtime.
type Backend struct{ rt *swtpmhost.Runtime }

var (
	_ agent.Backend  = (*Backend)(nil)
	_ agent.Pool     = (*Backend)(nil)
	_ agent.Exporter = (*Backend)(nil)
	_ agent.Resizer  = (*Backend)(nil)
)

// New makes the backend on rt.
func New(rt *swtpmhost.Runtime) *Backend { return &Backend{rt: rt} }

// Name implements agent.Backend.
func (b *Backend) Name() string { return "swtpm" }

// Capabilities implements agent.Backend: swtpm serves both versions; the
// guest device model is QEMU's business, so both models are offered.
func (b *Backend) Capabilities(ctx context.Context) (spec.Capabilities, error) {
	return spec.Capabilities{
		Enabled:  true,
		Versions: []spec.Version{spec.V12, spec.V20},
		Models:   []spec.Model{spec.TIS, spec.CRB},
	}, nil
}

// Sockets implements agent.Backend.
func (b *Backend) Sockets(id string) api.Sockets { return b.rt.Sockets(id) }

// PID implements agent.Server.
func (b *Backend) PID(id string) int { return b.rt.Running(id) }

// Connected implements agent.Server.
func (b *Backend) Connected(id string) bool { return b.rt.Connected(id) }

// Ensure implements agent.Backend.
func (b *Backend) Ensure(ctx context.Context, v agent.VTPM, secret []byte) ([]agent.EK, error) {
	return b.rt.Ensure(ctx, v, secret)
}

// Stop implements agent.Backend.
func (b *Backend) Stop(ctx context.Context, v agent.VTPM) error { return b.rt.Stop(ctx, v.InstanceID) }

// Destroy implements agent.Backend.
func (b *Backend) Destroy(ctx context.Context, v agent.VTPM) error {
	return b.rt.Remove(ctx, v.InstanceID)
}

// SetAside implements agent.Resizer.
func (b *Backend) SetAside(ctx context.Context, v agent.VTPM) error {
	return b.rt.SetAside(ctx, v.InstanceID)
}

// Restore implements agent.Resizer; swtpm needs no secret to put a state
// back.
func (b *Backend) Restore(ctx context.Context, v agent.VTPM, _ func() ([]byte, error)) error {
	return b.rt.Restore(ctx, v.InstanceID)
}

// Discard implements agent.Resizer.
func (b *Backend) Discard(ctx context.Context, v agent.VTPM) error {
	return b.rt.Discard(ctx, v.InstanceID)
}

// Claim implements agent.Pool from the runtime's pool.
func (b *Backend) Claim(v spec.Version) (secret []byte, adopt func(ctx context.Context, instanceID string) error, discard func(), ok bool) {
	return b.rt.Claim(v)
}

// Adopted implements agent.Pool.
func (b *Backend) Adopted(instanceID string) bool { return b.rt.Adopted(instanceID) }

// Drift compares the runtime's state directories with the host's vTPMs
// (swtpmhost.Runtime.Drift).
func (b *Backend) Drift(ctx context.Context, records func(context.Context) ([]agent.VTPM, error), repair bool) ([]api.Finding, error) {
	return b.rt.Drift(ctx, records, repair)
}

// Export implements agent.Exporter (swtpmhost.Runtime.Export).
func (b *Backend) Export(ctx context.Context, v agent.VTPM) ([]bundle.File, error) {
	return b.rt.Export(ctx, b.rt.Dir(v.InstanceID))
}

// Import implements agent.Exporter (swtpmhost.Runtime.Import).
func (b *Backend) Import(ctx context.Context, v agent.VTPM, secret []byte, files []bundle.File, eks []agent.EK) error {
	return b.rt.Import(ctx, v, secret, files, eks, b.rt.Dir(v.InstanceID))
}
