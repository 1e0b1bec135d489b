// Command migrateinit is the /init of the live migration test guests: a
// guest that keeps running, so a migration can be watched from its serial
// console. It mounts the kernel's file systems and prints, once per boot,
//
//	MIGRATEINIT BOOT <nonce>
//
// then, if it has a TPM, writes a random value to NV index 0x01500016
// (defining it on the first boot of the TPM) and prints
//
//	MIGRATEINIT NV WROTE <hex>
//
// and then every second, asking its TPM each time,
//
//	MIGRATEINIT TICK <n> PCRS <sha256 of PCRs 0–7 and 16> NV <hex>
//
// ("PCRS none NV none" without a TPM; "error …" for a failed read). A
// guest that rebooted prints BOOT again with another nonce; one whose TPM
// broke prints errors.
//
// With vtpmd.server=URL on the kernel command line (and the server's CA
// at /etc/vtpmd/ca.pem in the image, for https) it also runs the guest
// agent over QEMU user networking: it registers once, printing
//
//	MIGRATEINIT REGISTERED
//
// (or "MIGRATEINIT REGISTER error …", and tries again at the next tick),
// and after each tick attests and prints the verdict on that quote:
//
//	MIGRATEINIT VERDICT <n> <verdict> <reasons>
//
// ("error …" for an attestation that failed). Built static (CGO_ENABLED=0).
package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"

	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/guest/usernet"
)

// nvIndex is the NV index the guest writes at boot and reads on every tick.
const nvIndex = 0x01500016

func main() {
	for _, m := range [][3]string{{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"},
		{"securityfs", "/sys/kernel/security", "securityfs"}} {
		os.MkdirAll(m[1], 0o755)
		if err := syscall.Mount(m[0], m[1], m[2], 0, ""); err != nil && err != syscall.EBUSY {
			fmt.Printf("MIGRATEINIT mount %s: %v\n", m[1], err)
		}
	}
	// Kernel messages on the console would split the lines tests read.
	syscall.Syscall(syscall.SYS_SYSLOG, 8, 0, 1)
	nonce := make([]byte, 8)
	rand.Read(nonce)
	fmt.Printf("MIGRATEINIT BOOT %x\n", nonce)

	// The TPM driver may probe after init starts.
	tpm, err := linuxtpm.Open("/dev/tpmrm0")
	for deadline := time.Now().Add(20 * time.Second); err != nil && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
		tpm, err = linuxtpm.Open("/dev/tpmrm0")
	}
	if err != nil {
		tpm = nil
	}
	if tpm != nil {
		v := make([]byte, 16)
		rand.Read(v)
		if err := nvWrite(tpm, v); err != nil {
			fmt.Printf("MIGRATEINIT NV error %v\n", err)
		} else {
			fmt.Printf("MIGRATEINIT NV WROTE %x\n", v)
		}
	}
	agent := guestAgent(tpm)
	registered := false
	for n := 1; ; n++ {
		pcrs, nv := "none", "none"
		if tpm != nil {
			pcrs, nv = readPCRs(), nvRead(tpm)
		}
		fmt.Printf("MIGRATEINIT TICK %d PCRS %s NV %s\n", n, pcrs, nv)
		if agent != nil {
			registered = attest(agent, n, registered)
		}
		time.Sleep(time.Second)
	}
}

// guestAgent is the guest agent for the server vtpmd.server= names, its
// network up; nil without a TPM or a server.
func guestAgent(tpm transport.TPM) *attestor.Agent {
	cmdline, _ := os.ReadFile("/proc/cmdline")
	var server string
	for _, f := range strings.Fields(string(cmdline)) {
		if v, ok := strings.CutPrefix(f, "vtpmd.server="); ok {
			server = v
		}
	}
	if tpm == nil || server == "" {
		return nil
	}
	if err := usernet.Up(); err != nil {
		fmt.Printf("MIGRATEINIT NETWORK error %v\n", err)
		return nil
	}
	api := client.New(server, "")
	if _, err := os.Stat(caFile); err == nil {
		pool, err := client.LoadCAs(caFile)
		if err != nil {
			fmt.Printf("MIGRATEINIT CA error %v\n", err)
			return nil
		}
		api = api.WithTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	}
	uuid, err := os.ReadFile("/sys/class/dmi/id/product_uuid")
	if err != nil {
		fmt.Printf("MIGRATEINIT UUID error %v\n", err)
		return nil
	}
	return &attestor.Agent{TPM: tpm, API: api, Subject: client.Instance(strings.ToLower(strings.TrimSpace(string(uuid)))),
		IMALog: attestor.DefaultIMALog}
}

// caFile is where the image holds the server's CA.
const caFile = "/etc/vtpmd/ca.pem"

// attest registers agent unless it is registered already, then attests
// and prints the verdict of tick n; it says whether agent is registered.
func attest(agent *attestor.Agent, n int, registered bool) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if !registered {
		if err := agent.Register(ctx); err != nil {
			fmt.Printf("MIGRATEINIT REGISTER error %s\n", oneLine(err.Error()))
			return false
		}
		fmt.Println("MIGRATEINIT REGISTERED")
	}
	a, err := agent.Attest(ctx)
	if err != nil {
		fmt.Printf("MIGRATEINIT VERDICT %d error %s\n", n, oneLine(err.Error()))
		return true
	}
	fmt.Printf("MIGRATEINIT VERDICT %d %s %s\n", n, a.Verdict, oneLine(strings.Join(a.Reasons, "; ")))
	return true
}

// oneLine is s on one line.
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// readPCRs is the SHA-256 of PCRs 0–7 and 16 (SHA-256 bank), as the
// kernel reads them from the TPM.
func readPCRs() string {
	h := sha256.New()
	for _, i := range []int{0, 1, 2, 3, 4, 5, 6, 7, 16} {
		b, err := os.ReadFile(fmt.Sprintf("/sys/class/tpm/tpm0/pcr-sha256/%d", i))
		if err != nil {
			return "error:" + strings.ReplaceAll(err.Error(), " ", "_")
		}
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func nvHandle(tpm transport.TPM) (tpm2.NamedHandle, error) {
	rp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(nvIndex)}.Execute(tpm)
	if err != nil {
		return tpm2.NamedHandle{}, err
	}
	return tpm2.NamedHandle{Handle: tpm2.TPMHandle(nvIndex), Name: rp.NVName}, nil
}

func nvWrite(tpm transport.TPM, data []byte) error {
	h, err := nvHandle(tpm)
	if err != nil {
		pub := tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: tpm2.TPMHandle(nvIndex), NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, AuthWrite: true, NT: tpm2.TPMNTOrdinary},
			DataSize:   uint16(len(data)),
		})
		if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: pub}).Execute(tpm); err != nil {
			return fmt.Errorf("NV_DefineSpace: %w", err)
		}
		if h, err = nvHandle(tpm); err != nil {
			return err
		}
	}
	if _, err := (tpm2.NVWrite{AuthHandle: h, NVIndex: h, Data: tpm2.TPM2BMaxNVBuffer{Buffer: data}}).Execute(tpm); err != nil {
		return fmt.Errorf("NV_Write: %w", err)
	}
	return nil
}

func nvRead(tpm transport.TPM) string {
	h, err := nvHandle(tpm)
	if err == nil {
		var r *tpm2.NVReadResponse
		if r, err = (tpm2.NVRead{AuthHandle: h, NVIndex: h, Size: 16}).Execute(tpm); err == nil {
			return hex.EncodeToString(r.Data.Buffer)
		}
	}
	return "error:" + strings.ReplaceAll(err.Error(), " ", "_")
}
