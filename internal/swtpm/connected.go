package swtpm

import (
	"bufio"
	"fmt"
	"os"
	"strings"
)

// Connected reports whether a client, such as QEMU, holds a connection on
// the unix socket at path (a vTPM's control socket): the kernel lists the
// server's end of each accepted connection under the socket's path, in
// state connected. QEMU connects once, when it starts; it does not
// reconnect to a swtpm started after it.
func Connected(path string) (bool, error) {
	f, err := os.Open("/proc/net/unix")
	if err != nil {
		return false, err
	}
	defer f.Close()
	const connected = "03" // SS_CONNECTED
	sc := bufio.NewScanner(f)
	sc.Scan() // the header
	for sc.Scan() {
		// Num RefCount Protocol Flags Type St Inode Path
		f := strings.Fields(sc.Text())
		if len(f) == 8 && f[5] == connected && f[7] == path {
			return true, nil
		}
	}
	if err := sc.Err(); err != nil {
		return false, fmt.Errorf("reading /proc/net/unix: %w", err)
	}
	return false, nil
}
