// Package usernet configures a test guest's network for QEMU user
// networking (libvirt's <interface type='user'>, an e1000 NIC): the guest
// is 10.0.2.15/24 and its host, where vtpmd is reached, 10.0.2.2. It is
// linked into the static /init programs of the real-VM tests.
package usernet

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Up loads the e1000 driver from /lib/modules/e1000.ko and gives eth0
// 10.0.2.15/24; the host (10.0.2.2) is then on the link.
func Up() error {
	f, err := os.Open("/lib/modules/e1000.ko")
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && err != unix.EEXIST {
		return fmt.Errorf("loading e1000: %w", err)
	}
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		return err
	}
	defer unix.Close(s)
	var ifr *unix.Ifreq
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if ifr, err = unix.NewIfreq("eth0"); err == nil {
			if err = unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no eth0: %w", err)
		}
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP | unix.IFF_RUNNING)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bringing eth0 up: %w", err)
	}
	for _, set := range []struct {
		req  uint
		addr [4]byte
	}{{unix.SIOCSIFADDR, [4]byte{10, 0, 2, 15}}, {unix.SIOCSIFNETMASK, [4]byte{255, 255, 255, 0}}} {
		if err := ifr.SetInet4Addr(set.addr[:]); err != nil {
			return err
		}
		if err := unix.IoctlIfreq(s, set.req, ifr); err != nil {
			return fmt.Errorf("configuring eth0: %w", err)
		}
	}
	return nil
}
