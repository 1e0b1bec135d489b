// Package guest builds what the real-VM tests boot: the Debian kernel, taken
// from the linux-image package apt offers (downloaded and unpacked, never
// installed), and an initramfs whose /init is a static Go program. Both are
// cached under a folder, so only the first run pays for them.
package guest

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// CacheDir is where guest images are kept: $VTPMD_GUEST_CACHE, else
// .cache/guest at the root of the module (an ignored folder).
func CacheDir() (string, error) {
	if d := os.Getenv("VTPMD_GUEST_CACHE"); d != "" {
		return d, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Join(dir, ".cache", "guest"), nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory; set VTPMD_GUEST_CACHE")
		}
		dir = parent
	}
}

// Kernel is an unpacked Debian kernel.
type Kernel struct {
	Version string
	Vmlinuz string
	// E1000 is the e1000 network driver, which the Debian kernel builds
	// as a module (guest networking needs it).
	E1000 string
}

// kernelRE is the versioned image package the linux-image-amd64
// metapackage depends on.
var kernelRE = regexp.MustCompile(`Depends: (linux-image-[0-9][0-9a-z.+-]*-amd64)\b`)

// DebianKernel returns the kernel that linux-image-amd64 points at, from
// the cache or downloaded with apt-get and unpacked there.
func DebianKernel(ctx context.Context, cache string) (*Kernel, error) {
	out, err := exec.CommandContext(ctx, "apt-cache", "depends", "linux-image-amd64").Output()
	m := kernelRE.FindSubmatch(out)
	if err != nil || m == nil {
		// A machine whose package lists were never fetched knows no kernel.
		if uerr := exec.CommandContext(ctx, "apt-get", "update", "-qq").Run(); uerr != nil {
			return nil, fmt.Errorf("asking apt for the kernel package: %w (apt-get update: %v)", err, uerr)
		}
		out, err = exec.CommandContext(ctx, "apt-cache", "depends", "linux-image-amd64").Output()
		if m = kernelRE.FindSubmatch(out); err != nil || m == nil {
			return nil, fmt.Errorf("apt names no versioned kernel for linux-image-amd64 (%v):\n%s", err, out)
		}
	}
	pkg := string(m[1])
	version := strings.TrimPrefix(pkg, "linux-image-")
	dir := filepath.Join(cache, pkg)
	k := &Kernel{Version: version, Vmlinuz: filepath.Join(dir, "vmlinuz"), E1000: filepath.Join(dir, "e1000.ko")}
	if _, err := os.Stat(k.E1000); err == nil {
		return k, nil
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(cache, "download-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	dl := exec.CommandContext(ctx, "apt-get", "download", pkg)
	dl.Dir = tmp
	if out, err := dl.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("apt-get download %s: %w\n%s", pkg, err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return nil, fmt.Errorf("apt-get download %s left %d packages", pkg, len(debs))
	}
	files := map[string]string{
		"./boot/vmlinuz-" + version: filepath.Join(tmp, "vmlinuz"),
		"./lib/modules/" + version + "/kernel/drivers/net/ethernet/intel/e1000/e1000.ko": filepath.Join(tmp, "e1000.ko"),
	}
	if err := extractDeb(ctx, debs[0], files); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	// e1000.ko last: its presence means the kernel is complete.
	for _, name := range []string{"vmlinuz", "e1000.ko"} {
		if err := os.Rename(filepath.Join(tmp, name), filepath.Join(dir, name)); err != nil {
			return nil, err
		}
	}
	return k, nil
}

// extractDeb writes the package members named by files' keys to their
// values, reading the package's data through dpkg-deb.
func extractDeb(ctx context.Context, deb string, files map[string]string) error {
	cmd := exec.CommandContext(ctx, "dpkg-deb", "--fsys-tarfile", deb)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	defer cmd.Wait()
	tr := tar.NewReader(bufio.NewReader(stdout))
	left := len(files)
	for left > 0 {
		h, err := tr.Next()
		if err != nil {
			return fmt.Errorf("reading %s: %d files not found (%w)", filepath.Base(deb), left, err)
		}
		dst, ok := files[h.Name]
		if !ok {
			continue
		}
		f, err := os.Create(dst)
		if err != nil {
			return err
		}
		_, err = io.Copy(f, tr)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
		left--
	}
	io.Copy(io.Discard, stdout)
	return nil
}

// Initramfs returns a gzipped newc initramfs whose /init is the static
// build of the Go main package mainPkg, also at each path of initAlso (a
// program that acts by the name it is run as), with extra files (path in
// the image → file on the host), cached by the hash of its contents.
func Initramfs(ctx context.Context, cache, mainPkg string, extra map[string]string, initAlso ...string) (string, error) {
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return "", err
	}
	bin := filepath.Join(cache, "init-"+strings.ReplaceAll(path.Base(mainPkg), "/", "_"))
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, mainPkg)
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building %s: %w\n%s", mainPkg, err, out)
	}
	files := map[string][]byte{}
	init, err := os.ReadFile(bin)
	if err != nil {
		return "", err
	}
	files["init"] = init
	for _, p := range initAlso {
		files[strings.TrimPrefix(p, "/")] = init
	}
	for name, src := range extra {
		b, err := os.ReadFile(src)
		if err != nil {
			return "", err
		}
		files[strings.TrimPrefix(name, "/")] = b
	}
	img := newcArchive(files)
	sum := sha256.Sum256(img)
	out := filepath.Join(cache, "initramfs-"+hex.EncodeToString(sum[:8])+".cpio.gz")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(img)
	if err := zw.Close(); err != nil {
		return "", err
	}
	return out, atomicfile.Write(out, gz.Bytes(), 0o644)
}

// newcArchive is a cpio archive in the "newc" format the kernel unpacks:
// the directories the files need, /dev/console (so /init has a console),
// then the files, executable, in a stable order.
func newcArchive(files map[string][]byte) []byte {
	var w bytes.Buffer
	ino := uint32(0)
	entry := func(name string, mode, rdevMajor, rdevMinor uint32, data []byte) {
		ino++
		fmt.Fprintf(&w, "070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
			ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
		w.WriteString(name)
		w.WriteByte(0)
		pad(&w)
		w.Write(data)
		pad(&w)
	}
	dirs := map[string]bool{"dev": true, "proc": true, "sys": true}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
		for d := path.Dir(name); d != "."; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	sorted := make([]string, 0, len(dirs))
	for d := range dirs {
		sorted = append(sorted, d)
	}
	sort.Strings(sorted) // parents before children
	for _, d := range sorted {
		entry(d, 0o040755, 0, 0, nil)
	}
	entry("dev/console", 0o020600, 5, 1, nil)
	sort.Strings(names)
	for _, name := range names {
		entry(name, 0o100755, 0, 0, files[name])
	}
	entry("TRAILER!!!", 0, 0, 0, nil)
	return w.Bytes()
}

// pad aligns the archive to 4 bytes, as newc requires after names and data.
func pad(w *bytes.Buffer) {
	for w.Len()%4 != 0 {
		w.WriteByte(0)
	}
}
