package guest

import (
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/citest"
)

// TestNewcArchiveUnpacks checks the archive with the cpio tool the kernel's
// format comes from.
func TestNewcArchiveUnpacks(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		citest.Missing(t, "cpio is not installed (scripts/deps.sh installs it)")
	}
	img := newcArchive(map[string][]byte{"init": []byte("#!/bin/sh\n"), "lib/modules/e1000.ko": []byte("odd length")})
	cmd := exec.Command("cpio", "-t", "-v", "--quiet")
	cmd.Stdin = bytes.NewReader(img)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -t: %v\n%s", err, out)
	}
	for _, want := range []string{"dev/console", "init", "lib/modules/e1000.ko", "drwxr-xr-x", "crw-------"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("cpio listing lacks %q:\n%s", want, out)
		}
	}
	dir := t.TempDir()
	cmd = exec.Command("cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "-E", "/dev/null")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(img)
	cmd.Run() // dev/console needs mknod rights; the files matter here
	if b, err := os.ReadFile(filepath.Join(dir, "lib/modules/e1000.ko")); err != nil || string(b) != "odd length" {
		t.Fatalf("unpacked e1000.ko = %q, %v", b, err)
	}
}

// TestInitramfsIsCached builds the test init twice: the same image.
func TestInitramfsIsCached(t *testing.T) {
	cache := t.TempDir()
	a, err := Initramfs(context.Background(), cache, "github.com/vtpmd/vtpmd/internal/guest/testinit", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Initramfs(context.Background(), cache, "github.com/vtpmd/vtpmd/internal/guest/testinit", nil)
	if err != nil || a != b {
		t.Fatalf("second build: %s %v, first %s", b, err, a)
	}
	f, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	img, err := io.ReadAll(zr)
	if err != nil || !bytes.HasPrefix(img, []byte("070701")) || !bytes.Contains(img, []byte("TRAILER!!!")) {
		t.Fatalf("not a newc archive (%v)", err)
	}
}
