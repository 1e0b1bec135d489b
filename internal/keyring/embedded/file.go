package embedded

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/keyring"
)

// tmpPrefix starts the name of a file being written, not yet linked into
// place.
const tmpPrefix = ".tmp-"

// createFile writes data to dir/name crash-safely and never replaces an
// existing file: temp file (mode 0600), fsync, hard link to the final name
// (which fails if the name exists, unlike rename), unlink the temp, fsync
// the directory. A crash leaves either no dir/name or the complete one.
// When dir/name exists, the error wraps fs.ErrExist.
func createFile(dir, name string, data []byte) (err error) {
	f, err := os.CreateTemp(dir, tmpPrefix+"*")
	if err != nil {
		return fmt.Errorf("creating temp file: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if f != nil {
			f.Close()
		}
		os.Remove(tmp) // harmless after the link; cleans up on failure
	}()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", tmp, err)
	}
	err = f.Close()
	f = nil
	if err != nil {
		return fmt.Errorf("closing %s: %w", tmp, err)
	}
	if err := os.Link(tmp, filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("linking %s into place: %w", name, err)
	}
	if err := os.Remove(tmp); err != nil {
		return fmt.Errorf("removing %s: %w", tmp, err)
	}
	return atomicfile.SyncDir(dir)
}

// errTooLarge: a file is larger than its reader allows.
var errTooLarge = errors.New("file too large")

// readSmallFile reads a regular file of at most limit bytes without
// following a symlink in its last element. A missing file wraps
// fs.ErrNotExist, a larger one errTooLarge; mode is the file's mode for the
// caller to check.
func readSmallFile(path string, limit int64) (data []byte, mode fs.FileMode, err error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, 0, fmt.Errorf("%w: %s is a symlink", keyring.ErrInsecureMode, path)
		}
		return nil, 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	if !fi.Mode().IsRegular() {
		return nil, 0, fmt.Errorf("%w: %s is not a regular file", keyring.ErrInsecureMode, path)
	}
	if fi.Size() > limit {
		return nil, fi.Mode(), fmt.Errorf("%w: %s is %d bytes, more than %d", errTooLarge, path, fi.Size(), limit)
	}
	data = make([]byte, fi.Size())
	n, err := f.ReadAt(data, 0)
	if err != nil && n != len(data) {
		return nil, fi.Mode(), fmt.Errorf("reading %s: %w", path, err)
	}
	return data, fi.Mode(), nil
}
