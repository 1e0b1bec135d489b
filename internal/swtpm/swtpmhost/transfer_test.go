package swtpmhost

import (
	"context"
	"errors"
	"os"
	"os/user"
	"path/filepath"
	"reflect"
	"strconv"
	"syscall"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// TestImportElsewhere moves a TPM's state between two directories outside
// the runtime's root, as the libvirt backend does with libvirt's state
// directories: a state with another TPM's endorsement keys is refused and
// leaves nothing; the state proven lands in place with the identity of
// before, given to the user swtpm runs as (when the test may chown), 0700;
// and an import a crash cut after the old state went aside is finished by
// the next Manufacture of that directory.
func TestImportElsewhere(t *testing.T) {
	swtpmtest.Require(t)
	ctx := context.Background()
	maker, err := New(Config{Root: t.TempDir(), Certifier: certifier{swtpmtest.NewCA(t)}})
	if err != nil {
		t.Fatal(err)
	}
	defer maker.Close(ctx)
	cfg := Config{Root: t.TempDir()}
	uid := os.Getuid()
	if uid == 0 {
		u, err := user.Lookup("nobody")
		if err != nil {
			t.Fatal(err)
		}
		cfg.User, uid = "nobody", atoi(t, u.Uid)
	}
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	secret, err := keyring.NewVTPMSecret()
	if err != nil {
		t.Fatal(err)
	}
	v := agent.VTPM{InstanceID: instance, Spec: spec.Spec{Version: spec.V20}}
	src := filepath.Join(t.TempDir(), "tpm2")
	eks, err := maker.Manufacture(ctx, v, secret, src)
	if err != nil {
		t.Fatal(err)
	}
	files, err := maker.Export(ctx, src)
	if err != nil {
		t.Fatal(err)
	}

	parent := filepath.Join(t.TempDir(), instance)
	if err := os.Mkdir(parent, 0o711); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(parent, "tpm2")
	other := []agent.EK{{Kind: eks[0].Kind, Handle: eks[0].Handle, PublicDER: eks[1].PublicDER}, eks[1]}
	if err := r.Import(ctx, v, secret, files, other, dst); !errors.Is(err, ErrEKMismatch) {
		t.Fatalf("importing under another TPM's EKs: %v, want %v", err, ErrEKMismatch)
	}
	if entries, _ := os.ReadDir(parent); len(entries) != 0 {
		t.Fatalf("a refused import left %v", entries)
	}

	v.Manufactured = true
	if err := r.Import(ctx, v, secret, files, eks, dst); err != nil {
		t.Fatal(err)
	}
	for path, mode := range map[string]os.FileMode{dst: 0o700, filepath.Join(dst, "tpm2-00.permall"): 0o600} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := int(fi.Sys().(*syscall.Stat_t).Uid); fi.Mode().Perm() != mode || got != uid {
			t.Errorf("%s: mode %v owner %d, want %v owner %d", path, fi.Mode().Perm(), got, mode, uid)
		}
	}
	if got, err := r.Manufacture(ctx, v, secret, dst); err != nil || !reflect.DeepEqual(got, eks) {
		t.Fatalf("the imported TPM's identity: %+v %v, want %+v", got, err, eks)
	}

	// A second import proven, its old state moved aside, and the agent
	// killed before the staged state took its place.
	staging, old := stagingDirs(dst)
	if err := os.Rename(dst, old); err != nil {
		t.Fatal(err)
	}
	if err := stage(staging, files); err != nil {
		t.Fatal(err)
	}
	if got, err := r.Manufacture(ctx, v, secret, dst); err != nil || !reflect.DeepEqual(got, eks) {
		t.Fatalf("Manufacture after an interrupted import: %+v %v, want the imported TPM's EKs", got, err)
	}
	for _, gone := range []string{staging, old} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Fatalf("%s after the interrupted import was settled: %v", gone, err)
		}
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestExportWhileWritten exports a running TPM's state again and again
// while its guest keeps writing NV (each write makes swtpm write its
// permanent state again), as a periodic backup of a running vTPM does:
// every copy imports, swtpm opening it and proving it the same TPM
// (swtpm writes each state file whole, then renames it, so a copy is
// never a torn file, which its integrity check would refuse).
func TestExportWhileWritten(t *testing.T) {
	swtpmtest.Require(t)
	ctx := context.Background()
	r, err := New(Config{Root: t.TempDir(), Certifier: certifier{swtpmtest.NewCA(t)}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	secret, err := keyring.NewVTPMSecret()
	if err != nil {
		t.Fatal(err)
	}
	v := agent.VTPM{InstanceID: instance, Spec: spec.Spec{Version: spec.V20}}
	src := filepath.Join(t.TempDir(), "tpm2")
	eks, err := r.Manufacture(ctx, v, secret, src)
	if err != nil {
		t.Fatal(err)
	}
	swtpmtest.Start(t, swtpm.Instance{Dir: src, Version: spec.V20, Secret: secret})
	tpm, err := swtpm.Dial(ctx, filepath.Join(src, "tpm.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	const counter = tpm2.TPMHandle(0x01500020)
	pub := tpm2.New2B(tpm2.TPMSNVPublic{NVIndex: counter, NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NT: tpm2.TPMNTCounter, NoDA: true}, DataSize: 8})
	if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: pub}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	nvPub, _ := pub.Contents()
	nvName, err := tpm2.NVName(nvPub)
	if err != nil {
		t.Fatal(err)
	}
	index := tpm2.NamedHandle{Handle: counter, Name: *nvName}

	stop, written := make(chan struct{}), make(chan int, 1)
	go func() {
		n := 0
		defer func() { written <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := (tpm2.NVIncrement{AuthHandle: tpm2.TPMRHOwner, NVIndex: index}).Execute(tpm); err != nil {
				t.Errorf("incrementing the counter: %v", err)
				return
			}
			n++
		}
	}()
	const exports = 20
	for i := range exports {
		files, err := r.Export(ctx, src)
		if err != nil {
			close(stop)
			t.Fatalf("export %d: %v", i, err)
		}
		v.Manufactured = true
		if err := r.Import(ctx, v, secret, files, eks, filepath.Join(t.TempDir(), "tpm2")); err != nil {
			close(stop)
			t.Fatalf("export %d, taken while the counter was being written, does not import: %v", i, err)
		}
	}
	close(stop)
	if n := <-written; n < exports {
		t.Fatalf("the counter was incremented %d times over %d exports: the exports did not overlap the writes", n, exports)
	} else {
		t.Logf("%d exports, each imported and proven, while the guest incremented its counter %d times", exports, n)
	}
}
