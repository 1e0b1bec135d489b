package swtpm

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// TestCheckFindsFailureMode puts a real TPM into failure mode the way a
// full disk does (a command that writes its state, on a full tmpfs) and
// checks that the probe finds it from the TPM's answers alone, and that
// Process.Check reports it, for TPM 2.0 and 1.2. A working TPM passes both.
func TestCheckFindsFailureMode(t *testing.T) {
	if _, err := exec.LookPath("swtpm"); err != nil {
		citest.Missing(t, "swtpm is not on PATH")
	}
	disk := citest.SmallDisk(t, 4<<20)
	for _, v := range []spec.Version{spec.V20, spec.V12} {
		t.Run(string(v), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			raw := make([]byte, 384)
			rand.Read(raw)
			i := Instance{Dir: filepath.Join(disk, "v"+string(v)), Version: v, Secret: []byte(base64.StdEncoding.EncodeToString(raw))}
			_, p, err := ManufactureAndStart(ctx, i, ManufactureOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Stop(context.Background())
			tpm, err := Dial(ctx, i.DataSocket())
			if err != nil {
				t.Fatal(err)
			}
			defer tpm.Close()
			if err := checkTPM(tpm, v); err != nil {
				t.Fatalf("a working TPM: %v", err)
			}

			free := citest.Fill(t, disk)
			if v == spec.V12 {
				send12(tpm, cmd12(ordTSCPhysicalPresence, binary.BigEndian.AppendUint16(nil, ppPresent)))
				_, err = send12(tpm, cmd12(ordPhysicalSetDeactivated, []byte{1}))
			} else {
				pub := tpm2.New2B(tpm2.TPMSNVPublic{NVIndex: 0x01500003, NameAlg: tpm2.TPMAlgSHA256,
					Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true}, DataSize: 8})
				_, err = tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: pub}.Execute(tpm)
			}
			free()
			if err == nil {
				t.Fatal("the TPM wrote its state on a full disk")
			}
			if err := checkTPM(tpm, v); !errors.Is(err, ErrFailureMode) {
				t.Fatalf("probe of a TPM that failed to write its state: %v", err)
			}
			tpm.Close()
			if err := p.Check(ctx, true); !errors.Is(err, ErrFailureMode) {
				t.Fatalf("Check: %v", err)
			}
			// swtpm's output is read as it comes: its report may trail
			// the TPM's answer.
			for deadline := time.Now().Add(10 * time.Second); !p.out.failed(); time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("swtpm's report of failure mode was missed")
				}
			}
			// Without swtpm's report (a kept swtpm adopted after it), the
			// probe alone finds it.
			p.out.mu.Lock()
			p.out.failure = false
			p.out.mu.Unlock()
			if err := p.Check(ctx, true); !errors.Is(err, ErrFailureMode) {
				t.Fatalf("Check by probe: %v", err)
			}
			if err := p.Check(ctx, false); err != nil {
				t.Fatalf("Check without a probe, nothing reported: %v", err)
			}
		})
	}
}
