package swtpmhost

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// asideRoot holds, under Root, the state of the vTPMs whose resize to a new
// TPM awaits confirm or revert: <Root>/.resize/<instance>/, the old TPM
// exactly as it was, served by nothing. Drift skips it, as it skips every
// directory whose name starts with a dot.
const asideRoot = ".resize"

// AsideDir is where SetAside keeps vTPM id's old TPM.
func (r *Runtime) AsideDir(id string) string { return filepath.Join(r.cfg.Root, asideRoot, id) }

// SetAside stops vTPM id's swtpm and moves its state aside (one rename), so
// that the next Ensure makes a new TPM in its place. Once a state is aside
// it does nothing: what is in place by then is the new TPM, never to be set
// aside over the old.
func (r *Runtime) SetAside(ctx context.Context, id string) error {
	aside := r.AsideDir(id)
	if _, err := os.Stat(aside); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := r.Stop(ctx, id); err != nil {
		return err
	}
	dir := r.dir(id)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil // no state to keep: the old TPM was never made
	}
	if _, err := swtpm.KillStale(swtpm.Instance{Dir: dir}); err != nil {
		return fmt.Errorf("stopping the old TPM of %s: %w", id, err)
	}
	if err := os.MkdirAll(filepath.Dir(aside), 0o700); err != nil {
		return err
	}
	if err := os.Rename(dir, aside); err != nil {
		return fmt.Errorf("setting the state of %s aside: %w", id, err)
	}
	return r.syncRoots()
}

// Restore stops vTPM id's swtpm, removes the new TPM's state and puts the
// state set aside back in its place. With no state aside it does nothing:
// the old state is in place already (restored before, or never set aside).
func (r *Runtime) Restore(ctx context.Context, id string) error {
	aside := r.AsideDir(id)
	if _, err := os.Stat(aside); errors.Is(err, fs.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	if err := r.Stop(ctx, id); err != nil {
		return err
	}
	dir := r.dir(id)
	if _, err := swtpm.KillStale(swtpm.Instance{Dir: dir}); err != nil {
		return fmt.Errorf("stopping the new TPM of %s: %w", id, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing the new TPM of %s: %w", id, err)
	}
	if err := os.Rename(aside, dir); err != nil {
		return fmt.Errorf("putting the old state of %s back: %w", id, err)
	}
	return r.syncRoots()
}

// Discard removes the state of vTPM id set aside, if any.
func (r *Runtime) Discard(ctx context.Context, id string) error {
	if err := os.RemoveAll(r.AsideDir(id)); err != nil {
		return fmt.Errorf("removing the old state of %s: %w", id, err)
	}
	return nil
}

// syncRoots makes a rename between Root and the aside directory durable.
func (r *Runtime) syncRoots() error {
	if err := atomicfile.SyncDir(filepath.Join(r.cfg.Root, asideRoot)); err != nil {
		return err
	}
	return atomicfile.SyncDir(r.cfg.Root)
}
