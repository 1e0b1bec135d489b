package ctrl_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/ctrl"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

// TestAgainstSwtpm runs every command of the package against a real swtpm.
func TestAgainstSwtpm(t *testing.T) {
	i, _ := swtpmtest.Manufactured(t, spec.V20, nil)
	p := swtpmtest.Start(t, i)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := ctrl.Dial(ctx, i.CtrlSocket())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	caps, err := c.GetCapability(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := ctrl.CapInit | ctrl.CapShutdown | ctrl.CapSetLocality | ctrl.CapStoreVolatile | ctrl.CapStop |
		ctrl.CapGetConfig | ctrl.CapSetDataFD | ctrl.CapSetBufferSize | ctrl.CapGetInfo | ctrl.CapGetTPMEstablished
	if !caps.Has(want) {
		t.Fatalf("capabilities 0x%x lack 0x%x", caps, want&^caps)
	}
	cfg, err := c.GetConfig(ctx)
	if err != nil || cfg&ctrl.ConfigFileKey == 0 {
		t.Fatalf("config 0x%x, %v: the state is not encrypted with a key", cfg, err)
	}
	info, err := c.GetInfo(ctx, ctrl.InfoTPMSpecification|ctrl.InfoTPMAttributes)
	var parsed struct{ TPMSpecification, TPMAttributes map[string]any }
	if err != nil || json.Unmarshal(info, &parsed) != nil || parsed.TPMSpecification["family"] != "2.0" || parsed.TPMAttributes == nil {
		t.Fatalf("info %s, %v", info, err)
	}
	if _, err := c.GetTPMEstablished(ctx); err != nil {
		t.Fatal(err)
	}
	for loc := uint8(0); loc <= 4; loc++ {
		if err := c.SetLocality(ctx, loc); err != nil {
			t.Fatalf("locality %d: %v", loc, err)
		}
	}
	var re *ctrl.ResultError
	if err := c.SetLocality(ctx, 5); !errors.As(err, &re) || re.Code != ctrl.ResultBadLocality {
		t.Fatalf("locality 5: %v; want TPM_BAD_LOCALITY", err)
	}
	if err := c.SetLocality(ctx, 0); err != nil {
		t.Fatal(err)
	}
	// The buffer size is settable only while the TPM is stopped.
	if _, err := c.SetBufferSize(ctx, 4096); !errors.As(err, &re) {
		t.Fatalf("setting the buffer size of a running TPM: %v", err)
	}
	bs, err := c.SetBufferSize(ctx, 0)
	if err != nil || bs.Current == 0 || bs.Min > bs.Current || bs.Current > bs.Max {
		t.Fatalf("buffer size %+v, %v", bs, err)
	}

	// StoreVolatile saves the TPM's volatile state (PCRs, sessions); an
	// Init after Stop resumes from it, started, and deletes it.
	tpm, err := swtpm.Dial(ctx, i.DataSocket())
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	if _, err := (tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: 16, Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}}}}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	pcr16 := readPCR16(t, tpm)
	if err := c.StoreVolatile(ctx); err != nil {
		t.Fatal(err)
	}
	volatile := filepath.Join(i.Dir, "tpm2-00.volatilestate")
	if _, err := os.Stat(volatile); err != nil {
		t.Fatalf("after CMD_STORE_VOLATILE: %v", err)
	}
	if err := c.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.GetRandom{BytesRequested: 4}).Execute(tpm); err == nil {
		t.Fatal("a stopped TPM answered")
	}
	if _, err := c.SetBufferSize(ctx, 4096); err != nil {
		t.Fatalf("buffer size while stopped: %v", err)
	}
	if err := c.Init(ctx, ctrl.InitDeleteVolatile); err != nil {
		t.Fatal(err)
	}
	if got := readPCR16(t, tpm); !bytes.Equal(got, pcr16) {
		t.Fatal("Init did not resume the stored volatile state")
	}
	if _, err := os.Stat(volatile); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("volatile state not deleted: %v", err)
	}

	// Without a volatile state, Init is a reset: the TPM waits for
	// TPM2_Startup, as at a machine's power-on.
	if err := c.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Init(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.GetRandom{BytesRequested: 4}).Execute(tpm); !errors.Is(err, tpm2.TPMRCInitialize) {
		t.Fatalf("before TPM2_Startup: %v; want TPM_RC_INITIALIZE", err)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	if got := readPCR16(t, tpm); !bytes.Equal(got, make([]byte, 32)) {
		t.Fatalf("PCR 16 after a reset: %x", got)
	}
	tpm.Close()

	// Shutdown ends swtpm.
	if err := c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	case <-ctx.Done():
		t.Fatal("swtpm still runs after CMD_SHUTDOWN")
	}
	if err := p.Err(); err != nil {
		t.Fatalf("swtpm exit: %v", err)
	}
}

func readPCR16(t *testing.T, tpm transport.TPM) []byte {
	t.Helper()
	r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: []byte{0, 0, 1}}}}}.Execute(tpm)
	if err != nil || len(r.PCRValues.Digests) != 1 {
		t.Fatalf("PCR_Read: %v", err)
	}
	return r.PCRValues.Digests[0].Buffer
}

// A swtpm that is not running a TPM 1.2 answers the same protocol.
func TestAgainstSwtpmTPM12(t *testing.T) {
	i, _ := swtpmtest.Manufactured(t, spec.V12, nil)
	swtpmtest.Start(t, i)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := ctrl.Dial(ctx, i.CtrlSocket())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info, err := c.GetInfo(ctx, ctrl.InfoTPMSpecification)
	var parsed struct{ TPMSpecification map[string]any }
	if err != nil || json.Unmarshal(info, &parsed) != nil || parsed.TPMSpecification["family"] != "1.2" {
		t.Fatalf("info %s, %v", info, err)
	}
}
