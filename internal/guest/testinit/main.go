// Command testinit is the /init of the test guests' initramfs: it mounts
// the kernel's file systems, prints the TPM's PCRs 0–7 (SHA-256 bank) to the
// console as "PCR sha256:N=<hex>", the firmware's event log as
// "EVENTLOG <base64>", the TPM's identity and test NV indices as "TPM ..."
// lines (printTPM), then "VTPM-TESTINIT DONE", and powers the guest off.
// Built static (CGO_ENABLED=0).
package main

import (
	"encoding/base64"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"
)

func main() {
	for _, m := range []struct{ src, target, fstype string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
		{"securityfs", "/sys/kernel/security", "securityfs"},
	} {
		os.MkdirAll(m.target, 0o755)
		if err := syscall.Mount(m.src, m.target, m.fstype, 0, ""); err != nil && err != syscall.EBUSY {
			fmt.Printf("mount %s: %v\n", m.target, err)
		}
	}
	// Kernel messages on the console would split the long lines below.
	quietConsole()
	// The TPM driver may probe after init starts.
	const pcrs = "/sys/class/tpm/tpm0/pcr-sha256"
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := os.Stat(pcrs); err == nil {
			break
		}
		if time.Now().After(deadline) {
			fmt.Println("no TPM found")
			break
		}
	}
	for i := range 8 {
		b, err := os.ReadFile(fmt.Sprintf("%s/%d", pcrs, i))
		if err != nil {
			fmt.Printf("PCR sha256:%d error %v\n", i, err)
			continue
		}
		fmt.Printf("PCR sha256:%d=%s\n", i, strings.ToLower(strings.TrimSpace(string(b))))
	}
	if log, err := os.ReadFile("/sys/kernel/security/tpm0/binary_bios_measurements"); err == nil {
		fmt.Printf("EVENTLOG %s\n", base64.StdEncoding.EncodeToString(log))
	} else {
		fmt.Printf("EVENTLOG error %v\n", err)
	}
	printTPM()
	fmt.Println("VTPM-TESTINIT DONE")
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
}

// quietConsole stops the kernel printing anything but emergencies to the
// console (klogctl SYSLOG_ACTION_CONSOLE_LEVEL, level 1).
func quietConsole() {
	syscall.Syscall(syscall.SYS_SYSLOG, 8, 0, 1)
}
