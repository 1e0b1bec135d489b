package swtpmhost

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// RecordIdentity writes eks, a vTPM's endorsement keys as its record has
// them, beside the state in dir (IdentityFile): for a vTPM arriving by
// live migration, whose state the guest's QEMU hands its swtpm, so that
// this host knows it as one it made.
func RecordIdentity(dir string, eks []agent.EK) error {
	ids := make([]identityEK, len(eks))
	for i, ek := range eks {
		ids[i] = identityEK{Kind: ek.Kind, Handle: ek.Handle, NVIndex: ek.NVIndex, PublicDER: ek.PublicDER, CertDER: ek.CertDER}
	}
	data, err := json.Marshal(ids)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	if err := atomicfile.Write(filepath.Join(dir, IdentityFile), data, 0o600); err != nil {
		return fmt.Errorf("recording identity: %w", err)
	}
	return nil
}

// Receive makes ready vTPM v arriving by live migration: a state
// directory with v's identity (eks) and a swtpm serving it (a blank TPM,
// swtpm.Instance.Incoming), keyed by secret, for the incoming guest's QEMU
// to connect to and hand the state it brings. A swtpm that serves v
// already (a Receive run again) is kept. Remove undoes it.
func (r *Runtime) Receive(ctx context.Context, v agent.VTPM, secret []byte, eks []agent.EK) error {
	if r.Running(v.InstanceID) != 0 {
		return nil
	}
	inst := r.instance(v, secret)
	inst.Incoming = true
	if err := os.RemoveAll(inst.Dir); err != nil {
		return fmt.Errorf("clearing what an earlier attempt left: %w", err)
	}
	if err := RecordIdentity(inst.Dir, eks); err != nil {
		return err
	}
	return r.start(ctx, v.InstanceID, inst)
}
