package libvirt

import (
	"bytes"
	"fmt"
	"regexp"
	"strconv"
)

// QEMUConfPath is libvirt's QEMU driver configuration.
const QEMUConfPath = "/etc/libvirt/qemu.conf"

// nameRE is what a user or group name may be here: POSIX portable names,
// nothing that could end the quoted value or the line.
var nameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.-]{0,31}$`)

// ConfigureQEMUConf sets swtpm_user and swtpm_group in the contents of
// libvirt's qemu.conf, keeping every other line as it is. An active setting
// is replaced in place; else the line goes right after the commented-out
// default (`#swtpm_user = "tss"`), else at the end. It returns the new
// contents and one sentence per change; run again, it changes nothing.
func ConfigureQEMUConf(conf []byte, user, group string) ([]byte, []string, error) {
	for _, n := range []string{user, group} {
		if !nameRE.MatchString(n) {
			return nil, nil, fmt.Errorf("%q is not a valid user or group name", n)
		}
	}
	var changes []string
	for _, kv := range [][2]string{{"swtpm_user", user}, {"swtpm_group", group}} {
		var change string
		conf, change = setKey(conf, kv[0], kv[1])
		if change != "" {
			changes = append(changes, change)
		}
	}
	return conf, changes, nil
}

// setKey sets key = "value" in conf (see ConfigureQEMUConf).
func setKey(conf []byte, key, value string) ([]byte, string) {
	want := key + " = " + strconv.Quote(value)
	lines := bytes.SplitAfter(conf, []byte("\n"))
	active := regexp.MustCompile(`^\s*` + key + `\s*=\s*(.*?)\s*$`)
	commented := regexp.MustCompile(`^\s*#\s*` + key + `\s*=`)
	after := -1
	for i, l := range lines {
		if m := active.FindSubmatch(bytes.TrimRight(l, "\n")); m != nil {
			if string(m[1]) == strconv.Quote(value) {
				return conf, ""
			}
			lines[i] = []byte(want + "\n")
			return bytes.Join(lines, nil), fmt.Sprintf("%s: %s → %s", key, m[1], strconv.Quote(value))
		}
		if after < 0 && commented.Match(l) {
			after = i
		}
	}
	line := []byte(want + "\n")
	if after < 0 {
		if len(conf) > 0 && conf[len(conf)-1] != '\n' {
			conf = append(conf, '\n')
		}
		return append(conf, line...), fmt.Sprintf("%s: set to %q (appended)", key, value)
	}
	if !bytes.HasSuffix(lines[after], []byte("\n")) {
		lines[after] = append(lines[after], '\n')
	}
	out := append(bytes.Join(lines[:after+1], nil), line...)
	out = append(out, bytes.Join(lines[after+1:], nil)...)
	return out, fmt.Sprintf("%s: set to %q (after the commented default)", key, value)
}
