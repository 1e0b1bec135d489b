// Command attestinit is the /init of the attestation test guests: it mounts
// the kernel's file systems, loads the e1000 driver and configures QEMU
// user networking (10.0.2.15/24; vtpmd is reached at 10.0.2.2), runs the
// guest agent once (register, attest) against the server named by
// vtpmd.server= on the kernel command line, prints "VTPM-GUEST VERDICT
// <verdict> <reasons>" and powers off. Built static (CGO_ENABLED=0).
//
// With vtpmd.secret=NAME it is also the key broker's guest (see broker):
// it fetches the secret, opens vtpmd.sealed= (base64 AES-256-GCM, nonce
// first) with it, and waits for its revocation, running the action. The
// image has no shell: its /bin/sh is this program, which as sh prints
// "VTPM-GUEST ACTION <arguments> VTPM_SECRET=<name>".
package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/guest/usernet"
	"github.com/vtpmd/vtpmd/internal/keyrelease"
)

func main() {
	if filepath.Base(os.Args[0]) == "sh" {
		fmt.Printf("VTPM-GUEST ACTION %s VTPM_SECRET=%s\n", strings.Join(os.Args[1:], " "), os.Getenv("VTPM_SECRET"))
		return
	}
	if err := run(); err != nil {
		fmt.Println("VTPM-GUEST ERROR", err)
	}
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
}

func run() error {
	for _, m := range [][3]string{{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"}, {"securityfs", "/sys/kernel/security", "securityfs"}} {
		os.MkdirAll(m[1], 0o755)
		if err := syscall.Mount(m[0], m[1], m[2], 0, ""); err != nil && err != syscall.EBUSY {
			return fmt.Errorf("mounting %s: %w", m[1], err)
		}
	}
	// Kernel messages on the console would split the lines tests read:
	// only emergencies from here on (klogctl SYSLOG_ACTION_CONSOLE_LEVEL).
	unix.Syscall(unix.SYS_SYSLOG, 8, 0, 1)
	cmdline, _ := os.ReadFile("/proc/cmdline")
	var server, secret, sealed string
	for _, f := range strings.Fields(string(cmdline)) {
		if v, ok := strings.CutPrefix(f, "vtpmd.server="); ok {
			server = v
		}
		if v, ok := strings.CutPrefix(f, "vtpmd.secret="); ok {
			secret = v
		}
		if v, ok := strings.CutPrefix(f, "vtpmd.sealed="); ok {
			sealed = v
		}
	}
	if server == "" {
		return fmt.Errorf("no vtpmd.server= on the kernel command line")
	}
	if err := usernet.Up(); err != nil {
		return err
	}
	// The TPM driver may probe after init starts.
	t, err := linuxtpm.Open("/dev/tpmrm0")
	for deadline := time.Now().Add(20 * time.Second); err != nil && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
		t, err = linuxtpm.Open("/dev/tpmrm0")
	}
	if err != nil {
		return fmt.Errorf("no TPM: %w", err)
	}
	defer t.Close()
	uuid, err := os.ReadFile("/sys/class/dmi/id/product_uuid")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	id := strings.ToLower(strings.TrimSpace(string(uuid)))
	agent := &attestor.Agent{TPM: t, API: client.New(server, ""), Subject: client.Instance(id),
		IMALog: attestor.DefaultIMALog}
	if err := agent.Register(ctx); err != nil {
		return err
	}
	a, err := agent.Attest(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("VTPM-GUEST VERDICT %s %s\n", a.Verdict, strings.Join(a.Reasons, "; "))
	if secret == "" {
		return nil
	}
	return brokerGuest(ctx, agent, id, secret, sealed, a.Verdict)
}

// brokerGuest fetches secret (retrying while the first verdict is pending,
// for the test to judge this boot), opens sealed with it, prints the
// plaintext and the wrapped answer ("VTPM-GUEST DECRYPTED <text>",
// "VTPM-GUEST WRAPPED <base64 JSON>"), then waits on the agent's long poll
// for the secret's revocation: it runs the action (/bin/sh, see above),
// forgets the secret, asks for it again and prints the refusal. A refusal
// at the first fetch is printed ("VTPM-GUEST REFUSED <code>: <message>").
func brokerGuest(ctx context.Context, agent *attestor.Agent, id, secret, sealed, verdict string) error {
	holder := keyrelease.Holder{Dir: "/run/vtpm-guest"}
	var key []byte
	for {
		k, ws, err := keyrelease.Fetch(ctx, agent, id, secret)
		if err == nil {
			key = k
			raw, _ := json.Marshal(ws)
			fmt.Printf("VTPM-GUEST WRAPPED %s\n", base64.StdEncoding.EncodeToString(raw))
			break
		}
		if verdict != "pending" || ctx.Err() != nil {
			fmt.Printf("VTPM-GUEST REFUSED %v\n", err)
			return nil
		}
		agent.Wait(ctx, 2*time.Second)
		if _, err := agent.Attest(ctx); err != nil {
			return err
		}
	}
	ct, err := base64.StdEncoding.DecodeString(sealed)
	if err != nil || len(ct) < 12 {
		return fmt.Errorf("vtpmd.sealed: %v", err)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return err
	}
	gcm, _ := cipher.NewGCM(block)
	plain, err := gcm.Open(nil, ct[:12], ct[12:], nil)
	if err != nil {
		return fmt.Errorf("opening the sealed file: %w", err)
	}
	fmt.Printf("VTPM-GUEST DECRYPTED %s\n", plain)
	for ctx.Err() == nil {
		revoked := agent.Wait(ctx, 30*time.Second)
		if !slices.Contains(revoked, secret) {
			if _, err := agent.Attest(ctx); err != nil {
				return err
			}
			continue
		}
		fmt.Printf("VTPM-GUEST REVOKED %s\n", secret)
		if err := holder.Revoke(ctx, secret, "close-disk", os.Stdout); err != nil {
			return err
		}
		clear(key)
		_, _, err := keyrelease.Fetch(ctx, agent, id, secret)
		fmt.Printf("VTPM-GUEST REFUSED %v\n", err)
		return nil
	}
	return ctx.Err()
}
