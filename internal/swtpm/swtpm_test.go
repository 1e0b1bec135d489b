package swtpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm/ctrl"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

func newInstance(t testing.TB, v spec.Version) Instance {
	t.Helper()
	swtpmtest.Require(t)
	dir := t.TempDir()
	t.Cleanup(func() { swtpmtest.CheckNoProcesses(t, dir) })
	secret := make([]byte, 32)
	rand.Read(secret)
	return Instance{Dir: filepath.Join(dir, "vtpm"), Version: v, Secret: []byte(strconv.Quote(string(secret)))}
}

func start(t testing.TB, i Instance) *Process {
	t.Helper()
	p, err := Start(context.Background(), i, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(context.Background()) })
	return p
}

func TestStartManufacturedTPM20(t *testing.T) {
	i := newInstance(t, spec.V20)
	id, p, err := Manufacture(context.Background(), i, ManufactureOptions{PCRBanks: []string{"sha1", "sha256"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(context.Background()) })
	if len(id.EKs) != 2 || id.EKs[0].Handle != RSAEKHandle || id.EKs[1].Handle != ECCEKHandle || id.EKs[0].CertDER != nil {
		t.Fatalf("identity %+v", id)
	}
	if _, _, err := Manufacture(context.Background(), i, ManufactureOptions{}); err == nil {
		t.Fatal("manufacturing over an existing state succeeded")
	}

	// The control channel answers and reports an encrypted state.
	c, err := ctrl.Dial(i.CtrlSocket())
	if err != nil {
		t.Fatal(err)
	}
	caps, err := c.GetCapability()
	if err != nil || caps&ctrl.CapShutdown == 0 || caps&ctrl.CapGetConfig == 0 {
		t.Fatalf("capabilities 0x%x, %v", caps, err)
	}
	cfg, err := c.GetConfig()
	if err != nil || cfg&ctrl.ConfigFileKey == 0 {
		t.Fatalf("config 0x%x, %v: state not encrypted with a key", cfg, err)
	}
	c.Close()

	// The secret is in neither argv nor the environment of swtpm.
	for _, f := range []string{"cmdline", "environ"} {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(p.Pid()) + "/" + f)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, i.Secret) {
			t.Fatalf("secret found in /proc/PID/%s", f)
		}
	}

	// The EKs are where the identity says, and the PCR banks as asked.
	conn, err := net.Dial("unix", i.DataSocket())
	if err != nil {
		t.Fatal(err)
	}
	tpm := Retrying(transport.FromReadWriter(conn))
	for _, ek := range id.EKs {
		rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(ek.Handle)}.Execute(tpm)
		if err != nil {
			t.Fatalf("EK at 0x%x: %v", ek.Handle, err)
		}
		pub, _ := rp.OutPublic.Contents()
		if got, _ := tpm2.Pub(*pub); !publicEqual(got, ek.Public) {
			t.Fatalf("EK at 0x%x differs from the identity", ek.Handle)
		}
	}
	caprsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapPCRs, PropertyCount: 8}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	sel, _ := caprsp.CapabilityData.Data.AssignedPCR()
	var active []tpm2.TPMAlgID
	for _, s := range sel.PCRSelections {
		if len(s.PCRSelect) > 0 && s.PCRSelect[0] != 0 {
			active = append(active, s.Hash)
		}
	}
	if len(active) != 2 || active[0] != tpm2.TPMAlgSHA1 || active[1] != tpm2.TPMAlgSHA256 {
		t.Fatalf("active PCR banks %v; want sha1, sha256", active)
	}
	conn.Close()
}

// mustManufacture makes a TPM 2.0 in i.Dir and stops it.
func mustManufacture(t testing.TB, i Instance) {
	t.Helper()
	_, p, err := Manufacture(context.Background(), i, ManufactureOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func publicEqual(a, b any) bool {
	type eq interface{ Equal(crypto.PublicKey) bool }
	x, ok := a.(eq)
	return ok && x.Equal(b)
}

func TestWrongSecretLeavesStateAlone(t *testing.T) {
	i := newInstance(t, spec.V20)
	mustManufacture(t, i)
	before, err := os.ReadFile(filepath.Join(i.Dir, stateFileV20))
	if err != nil {
		t.Fatal(err)
	}
	wrong := i
	wrong.Secret = []byte("not the secret")
	if _, err := Start(context.Background(), wrong, nil); !errors.Is(err, ErrWrongSecret) {
		t.Fatalf("Start with a wrong secret: %v; want ErrWrongSecret", err)
	}
	after, _ := os.ReadFile(filepath.Join(i.Dir, stateFileV20))
	if !bytes.Equal(before, after) {
		t.Fatal("a failed start changed the state")
	}
	start(t, i) // the right secret still opens it
}

func TestTPM2ToolsThroughSocket(t *testing.T) {
	swtpmtest.Require(t, "tpm2_pcrread")
	i := newInstance(t, spec.V20)
	mustManufacture(t, i)
	start(t, i)
	cmd := exec.Command("tpm2_pcrread", "sha256:0,1,2")
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=swtpm:path="+i.DataSocket())
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "sha256:") {
		t.Fatalf("tpm2_pcrread: %v\n%s", err, out)
	}
}

func TestKilledProcessIsNoticed(t *testing.T) {
	i := newInstance(t, spec.V20)
	mustManufacture(t, i)
	p := start(t, i)
	syscall.Kill(p.Pid(), syscall.SIGKILL)
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed after kill -9")
	}
	// The state survives and serves again.
	start(t, i)
}

func TestTPM12(t *testing.T) {
	i := newInstance(t, spec.V12)
	var certified int
	id, p, err := Manufacture(context.Background(), i, ManufactureOptions{
		Certify: func(ctx context.Context, kind EKKind, pub crypto.PublicKey) ([]byte, error) {
			certified++
			return []byte{1}, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	p.Stop(context.Background())
	if len(id.EKs) != 1 || id.EKs[0].Kind != RSA2048 || certified != 1 {
		t.Fatalf("1.2 identity %+v", id)
	}
	start(t, i)
}

func BenchmarkManufacture(b *testing.B) {
	i := newInstance(b, spec.V20)
	for n := 0; b.Loop(); n++ {
		i.Dir = filepath.Join(filepath.Dir(i.Dir), strconv.Itoa(n))
		mustManufacture(b, i)
	}
}

func BenchmarkStartStop(b *testing.B) {
	i := newInstance(b, spec.V20)
	mustManufacture(b, i)
	for b.Loop() {
		p, err := Start(context.Background(), i, nil)
		if err != nil {
			b.Fatal(err)
		}
		p.Stop(context.Background())
	}
}
