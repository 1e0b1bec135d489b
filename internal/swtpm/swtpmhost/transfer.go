package swtpmhost

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/bundle"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// stateFileRE names what of a vTPM's directory is its state: swtpm's
// files (tpm2-00.permall, and tpm2-00.volatilestate or .savestate where
// swtpm left one; tpm-00.* for TPM 1.2), encrypted at rest with the vTPM's
// secret, and IdentityFile. Not its pid file, log or sockets, nor a temp
// file being written.
var stateFileRE = regexp.MustCompile(`^(tpm2?-00\.(permall|volatilestate|savestate)|` + regexp.QuoteMeta(IdentityFile) + `)$`)

// Export copies the state files of the vTPM in dir (Dir for the vTPMs
// this runtime runs; libvirt's state directory for those libvirt's swtpm
// runs) as they are at rest, for a bundle. swtpm writes each state file
// whole (a new file renamed over the old), so the copy of a running vTPM
// is its permanent state as last written: what a restart of swtpm would
// find. The TPM's volatile state (sessions, loaded objects) is not in it,
// as it is lost at any restart. A state being replaced (Import) is settled
// first.
func (r *Runtime) Export(ctx context.Context, dir string) ([]bundle.File, error) {
	if err := r.settleImport(dir); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(dir, IdentityFile)); err != nil {
		return nil, fmt.Errorf("exporting %s: no manufactured TPM on this host: %w", dir, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var files []bundle.File
	for _, e := range entries {
		if !e.Type().IsRegular() || !stateFileRE.MatchString(e.Name()) {
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if errors.Is(err, fs.ErrNotExist) {
			continue // a volatile state swtpm consumed meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("exporting %s: %w", dir, err)
		}
		files = append(files, bundle.File{Name: e.Name(), Data: data})
	}
	return files, nil
}

// Import replaces the state of v in dir (see Export), which no swtpm may
// serve, with files, keyed by secret, once they prove to be v's TPM: files
// are written to a staging directory beside dir, swtpm opens a copy of
// them with the secret, and each endorsement key it holds at the TCG
// handles must be the one of eks with the same handle (the vTPM's record),
// as must the identity recorded among them; the staged files are synced
// meanwhile. The staging directory is then given to the user swtpm runs
// as, as a manufactured state is, and takes dir's place (a rename; the old
// state, if v has any here, is removed after). Any refusal leaves the
// state as it was. TPM 2.0 only: a TPM 1.2's EK is not read back.
//
// A crash mid-swap is settled by the next Import, Export, Ensure or
// Manufacture of the state (settleImport): a verified import is finished,
// an unverified one dropped.
func (r *Runtime) Import(ctx context.Context, v agent.VTPM, secret []byte, files []bundle.File, eks []agent.EK, dir string) error {
	id := v.InstanceID
	if v.Spec.Version != spec.V20 {
		return fmt.Errorf("importing %s: only TPM 2.0 state is imported, not %s", id, v.Spec.Version)
	}
	if pid := r.Running(id); pid != 0 {
		return fmt.Errorf("importing %s: %w (swtpm pid %d)", id, ErrRunning, pid)
	}
	if err := r.settleImport(dir); err != nil {
		return err
	}
	staging, old := stagingDirs(dir)
	if err := os.RemoveAll(staging); err != nil {
		return err
	}
	fail := func(err error) error {
		os.RemoveAll(staging)
		return fmt.Errorf("importing %s: %w", id, err)
	}
	if err := stage(staging, files); err != nil {
		return fail(err)
	}
	// The proof waits on swtpm, the sync on the disk: they run together.
	synced := make(chan error, 1)
	go func() { synced <- r.syncStaged(staging, files) }()
	err := r.prove(ctx, staging, secret, eks)
	if err = errors.Join(err, <-synced); err != nil {
		return fail(err)
	}
	inst := r.instance(v, secret)
	inst.Dir = staging
	if err := swtpm.Own(inst); err != nil {
		return fail(err)
	}
	if _, err := swtpm.KillStale(swtpm.Instance{Dir: dir}); err != nil {
		return fail(fmt.Errorf("stopping a swtpm left on the old state: %w", err))
	}
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		// No state to replace (a vTPM arriving: migrating to this host, or
		// unshelved onto it): the proven state takes its place. A crash
		// before the rename leaves staged state alone, which settleImport
		// drops: the import is asked again.
		if err := os.Rename(staging, dir); err != nil {
			return fail(err)
		}
		return syncDir(filepath.Dir(dir))
	}
	// From here the import is proven: a crash is finished by settleImport.
	if err := os.Rename(dir, old); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fail(err)
	}
	return r.settleImport(dir)
}

// ErrRunning: the vTPM's swtpm runs; its state cannot be replaced under
// it.
var ErrRunning = errors.New("the vTPM is running")

// stagingDirs are the directories an import into dir writes to and
// moves the old state to, beside it; dot-named, so Drift leaves them
// alone.
func stagingDirs(dir string) (staging, old string) {
	parent, name := filepath.Split(dir)
	return filepath.Join(parent, ".import-"+name), filepath.Join(parent, ".replaced-"+name)
}

// settleImport finishes or drops what an interrupted Import into dir
// left. The old state is moved aside only after the staged one was
// proven, so the old state aside means the staged state is good: it takes
// the state's place if nothing has yet, and the old goes. Staged state
// with the old still in place was never proven, and goes.
func (r *Runtime) settleImport(dir string) error {
	staging, old := stagingDirs(dir)
	_, oerr := os.Stat(old)
	if oerr == nil {
		if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
			if err := os.Rename(staging, dir); err != nil {
				return fmt.Errorf("finishing the import into %s: %w", dir, err)
			}
			if err := syncDir(filepath.Dir(dir)); err != nil {
				return err
			}
		}
		return os.RemoveAll(old)
	}
	return os.RemoveAll(staging)
}

// stage writes files to a new directory staging, not yet synced
// (syncStaged).
func stage(staging string, files []bundle.File) error {
	if err := os.Mkdir(staging, 0o700); err != nil {
		return err
	}
	for _, f := range files {
		if !stateFileRE.MatchString(f.Name) {
			return fmt.Errorf("%q is not a swtpm state file", f.Name)
		}
		if err := writeNew(filepath.Join(staging, f.Name), f.Data); err != nil {
			return err
		}
	}
	return nil
}

// syncStaged syncs what stage wrote: each file, staging and the root.
func (r *Runtime) syncStaged(staging string, files []bundle.File) error {
	for _, f := range files {
		if err := syncFile(filepath.Join(staging, f.Name)); err != nil {
			return err
		}
	}
	if err := syncDir(staging); err != nil {
		return err
	}
	return syncDir(filepath.Dir(staging))
}

// prove opens a copy of the TPM state in dir with secret (swtpm.Identify)
// and checks that it is the TPM of eks: the identity recorded in dir, and
// the endorsement keys the TPM holds, are eks'.
func (r *Runtime) prove(ctx context.Context, dir string, secret []byte, eks []agent.EK) error {
	recorded, err := readIdentity(dir)
	if err != nil {
		return fmt.Errorf("the state has no recorded identity: %w", err)
	}
	if !sameEKs(recorded, eks) {
		return fmt.Errorf("%w: the identity recorded with the state is another TPM's", ErrEKMismatch)
	}
	id, err := swtpm.Identify(ctx, dir, r.cfg.Root, secret, r.cfg.Binary, r.log)
	if err != nil {
		return fmt.Errorf("opening the state with the vTPM's secret: %w", err)
	}
	var held []agent.EK
	for _, ek := range id.EKs {
		der, err := x509.MarshalPKIXPublicKey(ek.Public)
		if err != nil {
			return err
		}
		held = append(held, agent.EK{Kind: string(ek.Kind), Handle: ek.Handle, PublicDER: der})
	}
	if !sameEKs(held, eks) {
		return fmt.Errorf("%w: the TPM in the state holds other endorsement keys than the vTPM's record", ErrEKMismatch)
	}
	return nil
}

// ErrEKMismatch: state to import is not the vTPM's TPM.
var ErrEKMismatch = errors.New("endorsement keys differ")

// sameEKs says whether got and want hold the same public keys at the same
// handles.
func sameEKs(got, want []agent.EK) bool {
	if len(got) != len(want) || len(want) == 0 {
		return false
	}
	for _, w := range want {
		found := false
		for _, g := range got {
			if g.Handle == w.Handle && bytes.Equal(g.PublicDER, w.PublicDER) {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// writeNew writes data to a new file path (0600).
func writeNew(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
