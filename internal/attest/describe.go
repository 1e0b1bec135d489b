package attest

import (
	"encoding/binary"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf16"
)

// maxDescription bounds a description: event data is the guest's, of any
// length.
const maxDescription = 300

// Description says in words what the event measured, from its data as the
// TCG PC Client Platform Firmware Profile (section 10.4) lays it out: an
// EFI variable's name and vendor GUID (UEFI_VARIABLE_DATA), a boot
// application's file path (UEFI_IMAGE_LOAD_EVENT's device path), the
// string a boot loader logged (GRUB's commands and kernel command line,
// systemd-boot's), a separator; else the data as text when it is text,
// or its size. The text is the guest's own and may hold anything (markup
// included): callers escape it for where they show it.
func (e Event) Description() string {
	var s string
	switch e.Type {
	case 0x80000001, 0x80000002, 0x800000e0: // EV_EFI_VARIABLE_*
		s = efiVariable(e.Data)
	case 0x80000003, 0x80000004, 0x80000005: // EV_EFI_BOOT_SERVICES_*, RUNTIME_SERVICES_DRIVER
		s = imageLoad(e.Data)
	case 0x00000004: // EV_SEPARATOR
		if len(e.Data) == 4 && binary.LittleEndian.Uint32(e.Data) == 1 {
			return "separator (error)"
		}
		return "separator"
	case 0x80000006: // EV_EFI_GPT_EVENT
		return "GPT partition table"
	}
	if s == "" {
		s = text(e.Data)
	}
	if s == "" {
		s = fmt.Sprintf("%d bytes", len(e.Data))
	}
	if r := []rune(s); len(r) > maxDescription {
		s = string(r[:maxDescription]) + "…"
	}
	return s
}

// efiVariable describes a UEFI_VARIABLE_DATA: "variable NAME (GUID)".
func efiVariable(d []byte) string {
	if len(d) < 32 {
		return ""
	}
	n := binary.LittleEndian.Uint64(d[16:24])
	if n > uint64(len(d)-32)/2 {
		return ""
	}
	name := utf16String(d[32 : 32+2*n])
	return fmt.Sprintf("variable %s (%s)", name, guid(d[:16]))
}

// imageLoad describes a UEFI_IMAGE_LOAD_EVENT by its device path's file
// path nodes ("boot path \EFI\BOOT\BOOTX64.EFI"), or its firmware volume
// file (PIWG) GUID.
func imageLoad(d []byte) string {
	if len(d) < 32 {
		return ""
	}
	n := binary.LittleEndian.Uint64(d[24:32])
	if n > uint64(len(d)-32) {
		return ""
	}
	path := d[32 : 32+n]
	var files []string
	for len(path) >= 4 {
		typ, sub, size := path[0], path[1], int(binary.LittleEndian.Uint16(path[2:4]))
		if size < 4 || size > len(path) || typ == 0x7f {
			break
		}
		body := path[4:size]
		switch {
		case typ == 4 && sub == 4: // media, file path
			files = append(files, utf16String(body))
		case typ == 4 && sub == 6 && len(body) == 16: // media, PIWG firmware file
			files = append(files, "firmware file "+guid(body))
		}
		path = path[size:]
	}
	if len(files) == 0 {
		return "boot application (no file path)"
	}
	return "boot path " + strings.Join(files, "")
}

// text is d as text when it reads as such: printable ASCII or UTF-8, or
// UTF-16LE (firmware's strings), its NULs trimmed; else "".
func text(d []byte) string {
	t := strings.TrimRight(string(d), "\x00")
	if t != "" && printable(t) {
		return t
	}
	if len(d)%2 == 0 && len(d) >= 4 {
		if u := utf16String(d); u != "" && printable(u) {
			return u
		}
	}
	return ""
}

func printable(s string) bool {
	for _, r := range s {
		if r == unicode.ReplacementChar || !unicode.IsPrint(r) && r != '\n' && r != '\t' {
			return false
		}
	}
	return true
}

// utf16String decodes little-endian UTF-16, up to its first NUL.
func utf16String(b []byte) string {
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}

// guid formats an EFI_GUID (its first three fields little-endian).
func guid(b []byte) string {
	return fmt.Sprintf("%08x-%04x-%04x-%x-%x", binary.LittleEndian.Uint32(b[0:4]), binary.LittleEndian.Uint16(b[4:6]),
		binary.LittleEndian.Uint16(b[6:8]), b[8:10], b[10:16])
}
