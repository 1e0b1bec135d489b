package swtpm_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/ctrl"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func dial(t testing.TB, i swtpm.Instance) transport.TPM {
	t.Helper()
	tpm, err := swtpm.Dial(ctx(t), i.DataSocket())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tpm.Close() })
	return tpm
}

// readNV reads a whole NV index with its own (empty) authorisation.
func readNV(t testing.TB, tpm transport.TPM, index uint32) ([]byte, tpm2.TPMSNVPublic) {
	t.Helper()
	rp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(tpm)
	if err != nil {
		t.Fatalf("NV_ReadPublic 0x%08x: %v", index, err)
	}
	pub, err := rp.NVPublic.Contents()
	if err != nil {
		t.Fatal(err)
	}
	nv := tpm2.NamedHandle{Handle: pub.NVIndex, Name: rp.NVName}
	var data []byte
	for len(data) < int(pub.DataSize) {
		n := min(1024, int(pub.DataSize)-len(data))
		r, err := tpm2.NVRead{AuthHandle: nv, NVIndex: nv, Size: uint16(n), Offset: uint16(len(data))}.Execute(tpm)
		if err != nil {
			t.Fatalf("NV_Read 0x%08x: %v", index, err)
		}
		data = append(data, r.Data.Buffer...)
	}
	return data, *pub
}

func activeBanks(t testing.TB, tpm transport.TPM) []tpm2.TPMAlgID {
	t.Helper()
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapPCRs, PropertyCount: 8}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	sel, err := rsp.CapabilityData.Data.AssignedPCR()
	if err != nil {
		t.Fatal(err)
	}
	var active []tpm2.TPMAlgID
	for _, s := range sel.PCRSelections {
		if bytes.Count(s.PCRSelect, []byte{0xff}) == 3 {
			active = append(active, s.Hash)
		} else if !bytes.Equal(s.PCRSelect, make([]byte, len(s.PCRSelect))) {
			t.Fatalf("bank %v partly allocated: %x", s.Hash, s.PCRSelect)
		}
	}
	return active
}

func lockoutCounter(t testing.TB, tpm transport.TPM) uint32 {
	t.Helper()
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(tpm2.TPMPTLockoutCounter), PropertyCount: 1}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	props, err := rsp.CapabilityData.Data.TPMProperties()
	if err != nil || len(props.TPMProperty) == 0 || props.TPMProperty[0].Property != tpm2.TPMPTLockoutCounter {
		t.Fatalf("TPM_PT_LOCKOUT_COUNTER: %v", err)
	}
	return props.TPMProperty[0].Value
}

func TestManufactureTPM20(t *testing.T) {
	ca := swtpmtest.NewCA(t)
	i, id := swtpmtest.Manufactured(t, spec.V20, ca)
	if len(id.EKs) != 2 {
		t.Fatalf("%d EKs; want 2", len(id.EKs))
	}
	swtpmtest.Start(t, i)
	tpm := dial(t, i)

	want := []struct {
		kind   swtpm.EKKind
		handle uint32
		nv     uint32
	}{{swtpm.RSA2048, 0x81010001, 0x01c00002}, {swtpm.ECCP256, 0x81010002, 0x01c0000a}}
	for n, w := range want {
		ek := id.EKs[n]
		if ek.Kind != w.kind || ek.Handle != w.handle || ek.NVIndex != w.nv {
			t.Fatalf("EK %d: %s at 0x%08x, cert at 0x%08x; want %s, 0x%08x, 0x%08x", n, ek.Kind, ek.Handle, ek.NVIndex, w.kind, w.handle, w.nv)
		}
		// The TPM's key at the handle is the identity's.
		rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(ek.Handle)}.Execute(tpm)
		if err != nil {
			t.Fatalf("EK at 0x%08x: %v", ek.Handle, err)
		}
		pub, _ := rp.OutPublic.Contents()
		tpmKey, err := tpm2.Pub(*pub)
		if err != nil {
			t.Fatal(err)
		}
		if !equalKeys(tpmKey, ek.Public) {
			t.Fatalf("%s EK in the TPM differs from the identity", ek.Kind)
		}
		// The certificate in NV is the one issued, and certifies that key.
		der, nvPub := readNV(t, tpm, ek.NVIndex)
		if !bytes.Equal(der, ca.Issued(ek.Kind)) || !bytes.Equal(der, ek.CertDER) {
			t.Fatalf("%s EK certificate in NV differs from the one issued", ek.Kind)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		if err := cert.CheckSignatureFrom(ca.Cert); err != nil {
			t.Fatal(err)
		}
		if !equalKeys(cert.PublicKey, tpmKey) {
			t.Fatalf("%s EK certificate is for another key", ek.Kind)
		}
		// Attributes as swtpm_setup --lock-nvram leaves them.
		a := nvPub.Attributes
		if !a.PPWrite || a.OwnerWrite || a.AuthWrite || !a.PPRead || !a.OwnerRead || !a.AuthRead || !a.NoDA ||
			!a.PlatformCreate || !a.WriteDefine || !a.Written || !a.WriteLocked || nvPub.NameAlg != tpm2.TPMAlgSHA256 {
			t.Fatalf("NV 0x%08x attributes %+v", ek.NVIndex, a)
		}
		nv := tpm2.NamedHandle{Handle: nvPub.NVIndex, Name: nameOf(t, &nvPub)}
		_, err = tpm2.NVWrite{AuthHandle: tpm2.TPMRHPlatform, NVIndex: nv, Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte{0}}}.Execute(tpm)
		if !errors.Is(err, tpm2.TPMRCNVLocked) {
			t.Fatalf("writing the locked EK certificate: %v; want TPM_RC_NV_LOCKED", err)
		}
	}
	if banks := activeBanks(t, tpm); len(banks) != 1 || banks[0] != tpm2.TPMAlgSHA256 {
		t.Fatalf("active PCR banks %v; want sha256 only", banks)
	}
}

func nameOf(t testing.TB, pub *tpm2.TPMSNVPublic) tpm2.TPM2BName {
	t.Helper()
	n, err := tpm2.NVName(pub)
	if err != nil {
		t.Fatal(err)
	}
	return *n
}

func equalKeys(a, b any) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

func TestManufactureAndStartWithSHA1Bank(t *testing.T) {
	i := swtpmtest.Instance(t, spec.V20)
	id, p, err := swtpm.ManufactureAndStart(ctx(t), i, swtpm.ManufactureOptions{PCRBanks: []string{"sha1", "sha256"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(context.Background()) })
	if len(id.EKs) != 2 || id.EKs[0].CertDER != nil || id.EKs[0].NVIndex != 0 {
		t.Fatalf("identity without certifier: %+v", id)
	}
	tpm := dial(t, i)
	if banks := activeBanks(t, tpm); len(banks) != 2 || banks[0] != tpm2.TPMAlgSHA1 || banks[1] != tpm2.TPMAlgSHA256 {
		t.Fatalf("active PCR banks %v; want sha1, sha256", banks)
	}
	if _, err := (tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA1, PCRSelect: []byte{1, 0, 0}}}}}).Execute(tpm); err != nil {
		t.Fatalf("the TPM is not started: %v", err)
	}
}

func TestManufactureRefusesExistingState(t *testing.T) {
	i, _ := swtpmtest.Manufactured(t, spec.V20, nil)
	if _, err := swtpm.Manufacture(ctx(t), i, swtpm.ManufactureOptions{}); !errors.Is(err, swtpm.ErrManufactured) {
		t.Fatalf("manufacturing over a state: %v; want ErrManufactured", err)
	}
	empty := swtpmtest.Instance(t, spec.V20)
	if _, err := swtpm.Start(ctx(t), empty, nil); !errors.Is(err, swtpm.ErrNotManufactured) {
		t.Fatalf("starting without a state: %v; want ErrNotManufactured", err)
	}
	if _, err := os.Stat(empty.Dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a refused start left %s behind", empty.Dir)
	}
}

func TestFailedManufactureCanBeRetried(t *testing.T) {
	i := swtpmtest.Instance(t, spec.V20)
	boom := errors.New("CA unavailable")
	_, err := swtpm.Manufacture(ctx(t), i, swtpm.ManufactureOptions{
		Certify: func(context.Context, swtpm.EKKind, crypto.PublicKey) ([]byte, error) { return nil, boom },
	})
	if !errors.Is(err, boom) {
		t.Fatalf("manufacture with a failing certifier: %v", err)
	}
	// A certificate for another key is refused.
	ca := swtpmtest.NewCA(t)
	_, err = swtpm.Manufacture(ctx(t), i, swtpm.ManufactureOptions{
		Certify: func(context.Context, swtpm.EKKind, crypto.PublicKey) ([]byte, error) { return ca.Cert.Raw, nil },
	})
	if err == nil || !strings.Contains(err.Error(), "another key") {
		t.Fatalf("manufacture with a certificate for another key: %v", err)
	}
	if _, err := swtpm.Manufacture(ctx(t), i, swtpm.ManufactureOptions{}); err != nil {
		t.Fatalf("retrying: %v", err)
	}
}

func TestNVSurvivesRestart(t *testing.T) {
	i, _ := swtpmtest.Manufactured(t, spec.V20, nil)
	p := swtpmtest.Start(t, i)
	tpm, err := swtpm.Dial(ctx(t), i.DataSocket())
	if err != nil {
		t.Fatal(err)
	}
	pub := tpm2.TPMSNVPublic{
		NVIndex: 0x01500001, NameAlg: tpm2.TPMAlgSHA256, DataSize: 5,
		Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
	}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: tpm2.New2B(pub)}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	nv := tpm2.NamedHandle{Handle: pub.NVIndex, Name: nameOf(t, &pub)}
	if _, err := (tpm2.NVWrite{AuthHandle: tpm2.TPMRHOwner, NVIndex: nv, Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte("hello")}}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	tpm.Close()
	if err := p.Stop(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if err := p.Err(); err != nil {
		t.Fatalf("swtpm exit after Stop: %v", err)
	}

	swtpmtest.Start(t, i)
	tpm2c := dial(t, i)
	pub.Attributes.Written = true
	nv.Name = nameOf(t, &pub)
	r, err := tpm2.NVRead{AuthHandle: tpm2.TPMRHOwner, NVIndex: nv, Size: 5}.Execute(tpm2c)
	if err != nil || string(r.Data.Buffer) != "hello" {
		t.Fatalf("NV after restart: %q, %v", r.Data.Buffer, err)
	}
	// Stop shut the TPM down in order: no dictionary-attack strike.
	if n := lockoutCounter(t, tpm2c); n != 0 {
		t.Fatalf("lockout counter %d after a restart", n)
	}
}

func TestTPM2ToolsReadPCRs(t *testing.T) {
	swtpmtest.Require(t, "tpm2_pcrread")
	i, _ := swtpmtest.Manufactured(t, spec.V20, nil)
	swtpmtest.Start(t, i)
	cmd := exec.CommandContext(ctx(t), "tpm2_pcrread", "sha256:0,1,2,16")
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=swtpm:path="+i.DataSocket())
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "sha256:") || !strings.Contains(string(out), "16: 0x0000") {
		t.Fatalf("tpm2_pcrread: %v\n%s", err, out)
	}
}

// stateFiles maps the name of every regular file in dir to its contents.
func stateFiles(t testing.TB, dir string) map[string][]byte {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		files[e.Name()] = b
	}
	return files
}

func TestWrongSecret(t *testing.T) {
	for _, v := range []spec.Version{spec.V20, spec.V12} {
		t.Run(string(v), func(t *testing.T) {
			i, _ := swtpmtest.Manufactured(t, v, nil)
			before := stateFiles(t, i.Dir)
			wrong := i
			wrong.Secret = swtpmtest.Secret(t)
			if _, err := swtpm.Start(ctx(t), wrong, nil); !errors.Is(err, swtpm.ErrWrongSecret) {
				t.Fatalf("start with a wrong secret: %v; want ErrWrongSecret", err)
			}
			after := stateFiles(t, i.Dir)
			if len(after) != len(before) {
				t.Fatalf("files before %d, after %d", len(before), len(after))
			}
			for name, b := range before {
				if !bytes.Equal(b, after[name]) {
					t.Fatalf("a refused start changed %s", name)
				}
			}
			swtpmtest.Start(t, i) // the right secret still opens it
		})
	}
}

func TestStateHoldsNoPlaintext(t *testing.T) {
	ca := swtpmtest.NewCA(t)
	i, id := swtpmtest.Manufactured(t, spec.V20, ca)
	p := swtpmtest.Start(t, i)
	if err := p.Stop(ctx(t)); err != nil {
		t.Fatal(err)
	}
	files := stateFiles(t, i.Dir)
	if len(files) == 0 {
		t.Fatal("no state files")
	}
	for name, b := range files {
		for _, ek := range id.EKs {
			if len(ek.CertDER) == 0 {
				t.Fatal("EK without certificate")
			}
			if bytes.Contains(b, ek.CertDER) || bytes.Contains(b, ek.CertDER[len(ek.CertDER)-64:]) {
				t.Fatalf("%s holds the %s EK certificate in plaintext", name, ek.Kind)
			}
		}
		if bytes.Contains(b, i.Secret) {
			t.Fatalf("%s holds the secret", name)
		}
	}
	if info, err := os.Stat(i.Dir); err != nil || info.Mode().Perm() != 0o700 {
		t.Fatalf("state dir mode %v, %v; want 0700", info.Mode(), err)
	}
}

func TestSecretNotInArgvOrEnvironment(t *testing.T) {
	i, _ := swtpmtest.Manufactured(t, spec.V20, nil)
	t.Setenv("VTPM_TEST_MARKER", "vtpmd-env-must-not-leak")
	p := swtpmtest.Start(t, i)
	proc := "/proc/" + strconv.Itoa(p.Pid())
	for _, f := range []string{"cmdline", "environ"} {
		b, err := os.ReadFile(proc + "/" + f)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, i.Secret) || bytes.Contains(b, i.Secret[:32]) {
			t.Fatalf("the secret is in %s/%s", proc, f)
		}
		if bytes.Contains(b, []byte("vtpmd-env-must-not-leak")) {
			t.Fatalf("vtpmd's environment reached swtpm's %s", f)
		}
	}
	// swtpm closed the secret pipe (fd 3) after reading it; it may have
	// reused the number.
	if l, _ := os.Readlink(proc + "/fd/3"); strings.HasPrefix(l, "pipe:") {
		t.Fatal("swtpm still holds fd 3, the secret pipe")
	}
	// Its own process group, and dies with its parent.
	if pgid, _ := syscall.Getpgid(p.Pid()); pgid != p.Pid() {
		t.Fatalf("swtpm in process group %d", pgid)
	}
	if sock, err := os.Stat(i.DataSocket()); err != nil || sock.Mode().Perm() != 0o600 {
		t.Fatalf("data socket mode %v, %v; want 0600", sock.Mode(), err)
	}
}

func TestSecretNeverLogged(t *testing.T) {
	var buf bytes.Buffer
	var mu sync.Mutex
	log := slog.New(slog.NewTextHandler(lockedWriter{&buf, &mu}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	i := swtpmtest.Instance(t, spec.V20)
	if _, err := swtpm.Manufacture(ctx(t), i, swtpm.ManufactureOptions{Log: log}); err != nil {
		t.Fatal(err)
	}
	p, err := swtpm.Start(ctx(t), i, log)
	if err != nil {
		t.Fatal(err)
	}
	log.Info("instance", "inst", i)
	if err := p.Stop(ctx(t)); err != nil {
		t.Fatal(err)
	}
	wrong := i
	wrong.Secret = swtpmtest.Secret(t)
	_, err = swtpm.Start(ctx(t), wrong, log)
	printed := fmt.Sprintf("%v %+v %#v %s %v", i, i, i, i, err)
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(buf.String(), "manufactured TPM") {
		t.Fatalf("no debug log:\n%s", buf.String())
	}
	for _, secret := range [][]byte{i.Secret, wrong.Secret} {
		if bytes.Contains(buf.Bytes(), secret[:24]) || strings.Contains(printed, string(secret[:24])) {
			t.Fatalf("a secret is in the log or in a printed Instance:\n%s\n%s", buf.String(), printed)
		}
	}
}

type lockedWriter struct {
	w  *bytes.Buffer
	mu *sync.Mutex
}

func (l lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func TestKilledProcessIsNoticed(t *testing.T) {
	i, _ := swtpmtest.Manufactured(t, spec.V20, nil)
	p := swtpmtest.Start(t, i)
	if pid, err := swtpm.Stale(i); err != nil || pid != p.Pid() {
		t.Fatalf("Stale: %d, %v; want the running swtpm %d", pid, err, p.Pid())
	}
	if err := syscall.Kill(p.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed after kill -9")
	}
	if p.Err() == nil {
		t.Fatal("no exit error after kill -9")
	}
	if _, err := os.Stat(i.DataSocket()); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("socket left after exit: %v", err)
	}
	if pid, _ := swtpm.Stale(i); pid != 0 {
		t.Fatalf("Stale finds %d after the exit", pid)
	}
	swtpmtest.Start(t, i) // the state survives and serves again
}

func TestSecondStartIsRefused(t *testing.T) {
	i, _ := swtpmtest.Manufactured(t, spec.V20, nil)
	swtpmtest.Start(t, i)
	if _, err := swtpm.Start(ctx(t), i, nil); !errors.Is(err, swtpm.ErrBusy) {
		t.Fatalf("second start: %v; want ErrBusy", err)
	}
	// The first one still serves.
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(dial(t, i)); err != nil {
		t.Fatal(err)
	}
}

// A guest attaches the way QEMU does: it keeps the control connection,
// passes its data channel with CMD_SET_DATAFD, resets the TPM with CMD_INIT
// and lets the firmware send TPM2_Startup. That must work after swtpm's own
// startup-clear, without a dictionary-attack strike, and Stop must still end
// swtpm while the guest holds both channels.
func TestQEMUStyleAttach(t *testing.T) {
	i, _ := swtpmtest.Manufactured(t, spec.V20, nil)
	p := swtpmtest.Start(t, i)

	c, err := ctrl.Dial(ctx(t), i.CtrlSocket())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ours := setDataFD(t, c)
	if err := c.Stop(ctx(t)); err != nil {
		t.Fatalf("CMD_STOP: %v", err)
	}
	if _, err := c.SetBufferSize(ctx(t), 4096); err != nil {
		t.Fatalf("CMD_SET_BUFFERSIZE: %v", err)
	}
	if err := c.Init(ctx(t), 0); err != nil {
		t.Fatalf("CMD_INIT: %v", err)
	}
	guest := swtpm.Retrying(transport.FromReadWriter(ours))
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(guest); err != nil {
		t.Fatalf("the firmware's TPM2_Startup after CMD_INIT: %v", err)
	}
	if n := lockoutCounter(t, guest); n != 0 {
		t.Fatalf("lockout counter %d after a guest reset", n)
	}

	stopCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if err := p.Stop(stopCtx); err != nil {
		t.Fatalf("Stop while a guest holds the channels: %v", err)
	}
	t.Logf("stopped in %v with a guest attached", time.Since(start))
}

// TestRunAsUser runs swtpm as tss (the user swtpm-tools makes), with its
// sockets in a directory of their own that the group nogroup may connect to.
func TestRunAsUser(t *testing.T) {
	if os.Getuid() != 0 {
		citest.Missing(t, "switching users needs root")
	}
	tss, err := user.Lookup("tss")
	if err != nil {
		t.Fatalf("no user tss (swtpm-tools makes it; scripts/deps.sh installs it): %v", err)
	}
	clients, err := user.LookupGroup("nogroup")
	if err != nil {
		t.Fatal(err)
	}
	i := swtpmtest.Instance(t, spec.V20)
	i.User = "tss"
	// The user must reach the state dir: put it in a directory it may enter.
	os.Chmod(filepath.Dir(i.Dir), 0o711)
	if _, err := swtpm.Manufacture(ctx(t), i, swtpm.ManufactureOptions{}); err != nil {
		t.Fatal(err)
	}
	i.Socket, i.SocketGroup = filepath.Join(t.TempDir(), "vtpm.sock"), "nogroup"
	p := swtpmtest.Start(t, i)
	status, err := os.ReadFile("/proc/" + strconv.Itoa(p.Pid()) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) > 1 && f[0] == "Uid:" && f[1] != tss.Uid:
			t.Fatalf("swtpm runs as uid %s; want %s", f[1], tss.Uid)
		case len(f) > 0 && f[0] == "Groups:" && len(f) > 1:
			t.Fatalf("swtpm kept supplementary groups %v", f[1:])
		}
	}
	info, _ := os.Stat(filepath.Join(i.Dir, "tpm2-00.permall"))
	if st := info.Sys().(*syscall.Stat_t); strconv.Itoa(int(st.Uid)) != tss.Uid {
		t.Fatalf("state owned by uid %d", st.Uid)
	}
	for _, sock := range []string{i.DataSocket(), i.CtrlSocket()} {
		info, err := os.Stat(sock)
		if err != nil {
			t.Fatal(err)
		}
		st := info.Sys().(*syscall.Stat_t)
		if info.Mode() != fs.ModeSocket|0o660 || strconv.Itoa(int(st.Uid)) != tss.Uid || strconv.Itoa(int(st.Gid)) != clients.Gid {
			t.Errorf("%s: %v uid %d gid %d; want a socket 0660 of tss, group nogroup", sock, info.Mode(), st.Uid, st.Gid)
		}
	}
	if filepath.Dir(i.DataSocket()) == i.Dir {
		t.Fatal("the sockets are in the state directory")
	}
	tpm, err := swtpm.Dial(ctx(t), i.DataSocket())
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
		t.Fatalf("the TPM behind the moved socket: %v", err)
	}
}

// laps sums the step durations of "manufactured TPM" debug records.
type laps struct {
	mu   sync.Mutex
	n    int
	sums map[string]time.Duration
	keys []string
}

func (l *laps) Enabled(context.Context, slog.Level) bool { return true }
func (l *laps) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *laps) WithGroup(string) slog.Handler            { return l }
func (l *laps) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "manufactured TPM" {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sums == nil {
		l.sums = map[string]time.Duration{}
	}
	l.n++
	r.Attrs(func(a slog.Attr) bool {
		if a.Value.Kind() == slog.KindDuration {
			if _, ok := l.sums[a.Key]; !ok {
				l.keys = append(l.keys, a.Key)
			}
			l.sums[a.Key] += a.Value.Duration()
		}
		return true
	})
	return nil
}

// report adds the mean of each step, in ms, to the benchmark's output.
func (l *laps) report(b *testing.B) {
	for _, k := range l.keys {
		b.ReportMetric(float64(l.sums[k].Microseconds())/1000/float64(l.n), k+"-ms")
	}
}

func benchManufacture(b *testing.B, v spec.Version, andStart bool) {
	swtpmtest.Require(b)
	ca := swtpmtest.NewCA(b)
	root := swtpmtest.Dir(b)
	secret := swtpmtest.Secret(b)
	l := &laps{}
	opts := swtpm.ManufactureOptions{Certify: ca.Certify, Log: slog.New(l)}
	for n := 0; b.Loop(); n++ {
		i := swtpm.Instance{Dir: filepath.Join(root, strconv.Itoa(n)), Version: v, Secret: secret}
		if !andStart {
			if _, err := swtpm.Manufacture(context.Background(), i, opts); err != nil {
				b.Fatal(err)
			}
			continue
		}
		_, p, err := swtpm.ManufactureAndStart(context.Background(), i, opts)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		p.Stop(context.Background())
		b.StartTimer()
	}
	l.report(b)
}

// BenchmarkManufacture makes TPM 2.0 vTPMs with certified EKs in NV; the
// extra metrics say where the time goes.
func BenchmarkManufacture(b *testing.B) { benchManufacture(b, spec.V20, false) }

func BenchmarkManufactureAndStart(b *testing.B) { benchManufacture(b, spec.V20, true) }

func BenchmarkManufactureTPM12(b *testing.B) { benchManufacture(b, spec.V12, false) }

// BenchmarkStart times Start alone (Stop is outside the timer), for both
// TPM versions.
func BenchmarkStart(b *testing.B) {
	for _, v := range []spec.Version{spec.V20, spec.V12} {
		b.Run(string(v), func(b *testing.B) {
			i, _ := swtpmtest.Manufactured(b, v, nil)
			for b.Loop() {
				p, err := swtpm.Start(context.Background(), i, nil)
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := p.Stop(context.Background()); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

func BenchmarkStop(b *testing.B) {
	i, _ := swtpmtest.Manufactured(b, spec.V20, nil)
	for b.Loop() {
		b.StopTimer()
		p, err := swtpm.Start(context.Background(), i, nil)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := p.Stop(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
}

// Many vTPMs come up at once on one host, each its own process and state.
func TestManyInParallel(t *testing.T) {
	swtpmtest.Require(t)
	root := swtpmtest.Dir(t)
	const n = 8
	errs := make(chan error, n)
	for k := range n {
		go func() {
			i := swtpm.Instance{Dir: filepath.Join(root, strconv.Itoa(k)), Version: spec.V20, Secret: swtpmtest.Secret(t)}
			_, p, err := swtpm.ManufactureAndStart(ctx(t), i, swtpm.ManufactureOptions{})
			if err == nil {
				var tpm transport.TPMCloser
				if tpm, err = swtpm.Dial(ctx(t), i.DataSocket()); err == nil {
					_, err = tpm2.GetRandom{BytesRequested: 8}.Execute(tpm)
					tpm.Close()
				}
				if serr := p.Stop(ctx(t)); err == nil {
					err = serr
				}
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// A swtpm run the way libvirt runs it (its own control socket, no --flags,
// the same --key pwdfd form) opens a state vtpmd manufactured, so an
// operator can move a vTPM between vtpmd and libvirt.
func TestLibvirtStyleSwtpmOpensState(t *testing.T) {
	ca := swtpmtest.NewCA(t)
	i, id := swtpmtest.Manufactured(t, spec.V20, ca)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	w.Write(i.Secret)
	w.Close()
	ctrlPath := filepath.Join(i.Dir, "libvirt.ctrl")
	cmd := exec.Command("swtpm", "socket", "--ctrl", "type=unixio,path="+ctrlPath+",mode=0600",
		"--tpmstate", "dir="+i.Dir+",mode=0600", "--tpm2", "--key", "pwdfd=3,mode=aes-256-cbc")
	cmd.ExtraFiles = []*os.File{r}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r.Close()
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })

	var c *ctrl.Client
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if c, err = ctrl.Dial(ctx(t), ctrlPath); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ours := setDataFD(t, c)
	if err := c.Init(ctx(t), 0); err != nil {
		t.Fatalf("CMD_INIT (state load): %v", err)
	}
	tpm := swtpm.Retrying(transport.FromReadWriter(ours))
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	der, _ := readNV(t, tpm, swtpm.ECCEKCertNV)
	if !bytes.Equal(der, id.EKs[1].CertDER) {
		t.Fatal("the libvirt-style swtpm reads another ECC EK certificate")
	}
	if err := c.Shutdown(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("swtpm exit: %v", err)
	}
}

// setDataFD hands swtpm one end of a socket pair as its data channel, as
// QEMU does (CMD_SET_DATAFD), and returns the other end, closed when the
// test ends.
func setDataFD(t *testing.T, c *ctrl.Client) net.Conn {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "swtpm end")
	defer theirs.Close()
	ours, err := net.FileConn(os.NewFile(uintptr(fds[0]), "qemu end"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ours.Close() })
	if err := c.SetDataFD(ctx(t), theirs); err != nil {
		t.Fatalf("CMD_SET_DATAFD: %v", err)
	}
	return ours
}

// TestKeepAndAdopt: a kept swtpm writes its output to a file rather than
// to vtpmd, a later vtpmd adopts it by its pid file and can stop it, and a
// failed kept start is explained from that file.
func TestKeepAndAdopt(t *testing.T) {
	i, _ := swtpmtest.Manufactured(t, spec.V20, nil)
	i.Keep = true
	if p, err := swtpm.Adopt(i, nil); p != nil || err != nil {
		t.Fatalf("adopting where none runs: %v %v", p, err)
	}
	wrong := i
	wrong.Secret = swtpmtest.Secret(t)
	if _, err := swtpm.Start(ctx(t), wrong, nil); !errors.Is(err, swtpm.ErrWrongSecret) {
		t.Fatalf("a kept start with a wrong secret: %v; want ErrWrongSecret", err)
	}
	started, err := swtpm.Start(ctx(t), i, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(i.Dir, "swtpm.log")); err != nil {
		t.Fatalf("a kept swtpm's log: %v", err)
	}
	adopted, err := swtpm.Adopt(i, nil)
	if err != nil || adopted == nil || adopted.Pid() != started.Pid() {
		t.Fatalf("adopt: %v %v (started %d)", adopted, err, started.Pid())
	}
	tpm, err := swtpm.Dial(ctx(t), i.DataSocket())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
		t.Fatalf("the adopted TPM: %v", err)
	}
	tpm.Close()
	if err := adopted.Stop(ctx(t)); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*swtpm.Process{adopted, started} {
		select {
		case <-p.Done():
		case <-time.After(10 * time.Second):
			t.Fatalf("swtpm %d still runs after the adopted process was stopped", p.Pid())
		}
	}
	swtpmtest.CheckNoProcesses(t, i.Dir)
}
