package xen

import (
	"encoding/xml"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/google/uuid"
)

// Layout says where a Xen host keeps its vTPM stub domains' files and how
// they are named. Zero fields take the original design's values.
type Layout struct {
	// ImageDir holds each vTPM's 2 MiB NVRAM disk. Default
	// /var/lib/xen/images/nova_vtpms.
	ImageDir string
	// ConfigDir holds the xl and libvirt configurations. Default ImageDir.
	ConfigDir string
	// Kernel is the vTPM stub domain's kernel. Default
	// /usr/lib/xen/boot/vtpm-stubdom.gz.
	Kernel string
	// Manager is the VTPM manager domain's name. Default vtpmmgr.
	Manager string
}

const (
	// ImageSize is a vTPM stub domain's disk: 2 MiB, as the original sized it.
	ImageSize = 2 << 20
	// stubMemoryMiB is a vTPM stub domain's memory.
	stubMemoryMiB = 8
)

func (l Layout) withDefaults() Layout {
	if l.ImageDir == "" {
		l.ImageDir = "/var/lib/xen/images/nova_vtpms"
	}
	if l.ConfigDir == "" {
		l.ConfigDir = l.ImageDir
	}
	if l.Kernel == "" {
		l.Kernel = "/usr/lib/xen/boot/vtpm-stubdom.gz"
	}
	if l.Manager == "" {
		l.Manager = "vtpmmgr"
	}
	return l
}

// StubDomain is one instance's vTPM: a stub domain served by the VTPM
// manager under UUID, and attached to its guest by Name.
type StubDomain struct {
	Name    string
	UUID    uuid.UUID
	Image   string
	Kernel  string
	Manager string
}

// StubDomain is the vTPM stub domain of instanceID under l.
func (l Layout) StubDomain(instanceID string, id uuid.UUID) StubDomain {
	l = l.withDefaults()
	name := "vtpm-" + instanceID
	return StubDomain{Name: name, UUID: id, Image: filepath.Join(l.ImageDir, name+".img"), Kernel: l.Kernel, Manager: l.Manager}
}

// Files are the configuration files of instanceID's stub domain.
func (l Layout) Files(instanceID string) (xl, libvirtXML, guestXL, guestXML string) {
	base := filepath.Join(l.withDefaults().ConfigDir, "vtpm-"+instanceID)
	return base + ".cfg", base + ".xml", base + ".guest.cfg", base + ".guest.xml"
}

// XL is the stub domain's xl configuration (xl.cfg(5)).
func (d StubDomain) XL() []byte {
	return xlConfig{
		{"name", d.Name},
		{"kernel", d.Kernel},
		{"memory", stubMemoryMiB},
		{"disk", []string{"file:" + d.Image + ",hda,w"}},
		{"vtpm", []string{"backend=" + d.Manager + ",uuid=" + d.UUID.String()}},
	}.marshal()
}

// GuestXL is what a guest's xl configuration needs to use this vTPM.
func (d StubDomain) GuestXL() []byte {
	return xlConfig{{"vtpm", []string{"backend=" + d.Name}}}.marshal()
}

// xlConfig is an xl configuration, in order: strings are quoted, numbers
// bare, lists of strings bracketed.
type xlConfig []struct {
	key   string
	value any // string, int or []string
}

func (c xlConfig) marshal() []byte {
	var b strings.Builder
	for _, s := range c {
		b.WriteString(s.key + " = ")
		switch v := s.value.(type) {
		case string:
			b.WriteString(strconv.Quote(v))
		case int:
			b.WriteString(strconv.Itoa(v))
		case []string:
			b.WriteString("[")
			for i, e := range v {
				if i > 0 {
					b.WriteString(", ")
				}
				b.WriteString(strconv.Quote(e))
			}
			b.WriteString("]")
		}
		b.WriteString("\n")
	}
	return []byte(b.String())
}

// ParseXL reads an xl configuration: KEY = VALUE settings, one per line,
// where VALUE is a number, a string in single or double quotes, or a
// bracketed list of those; # starts a comment. Strings come back as string,
// numbers as int, lists as []string.
func ParseXL(text []byte) (map[string]any, error) {
	out := map[string]any{}
	for n, line := range strings.Split(string(text), "\n") {
		p := &xlParser{s: line}
		p.space()
		if p.done() {
			continue
		}
		key := p.ident()
		p.space()
		if key == "" || !p.eat('=') {
			return nil, fmt.Errorf("xl line %d: want KEY = VALUE", n+1)
		}
		p.space()
		v, err := p.value()
		if err != nil {
			return nil, fmt.Errorf("xl line %d (%s): %w", n+1, key, err)
		}
		p.space()
		if !p.done() {
			return nil, fmt.Errorf("xl line %d (%s): unexpected %q", n+1, key, p.s[p.i:])
		}
		out[key] = v
	}
	return out, nil
}

type xlParser struct {
	s string
	i int
}

func (p *xlParser) done() bool { return p.i >= len(p.s) || p.s[p.i] == '#' }

func (p *xlParser) space() {
	for p.i < len(p.s) && (p.s[p.i] == ' ' || p.s[p.i] == '\t' || p.s[p.i] == '\r') {
		p.i++
	}
}

func (p *xlParser) eat(c byte) bool {
	if p.i < len(p.s) && p.s[p.i] == c {
		p.i++
		return true
	}
	return false
}

func (p *xlParser) ident() string {
	start := p.i
	for p.i < len(p.s) && (p.s[p.i] == '_' || p.s[p.i] >= 'a' && p.s[p.i] <= 'z' || p.s[p.i] >= 'A' && p.s[p.i] <= 'Z' || p.i > start && p.s[p.i] >= '0' && p.s[p.i] <= '9') {
		p.i++
	}
	return p.s[start:p.i]
}

func (p *xlParser) value() (any, error) {
	if p.eat('[') {
		list := []string{}
		for {
			p.space()
			if p.eat(']') {
				return list, nil
			}
			if len(list) > 0 && !p.eat(',') {
				return nil, fmt.Errorf("want , or ] in a list")
			}
			p.space()
			if p.eat(']') { // a trailing comma
				return list, nil
			}
			v, err := p.scalar()
			if err != nil {
				return nil, err
			}
			list = append(list, fmt.Sprint(v))
		}
	}
	return p.scalar()
}

func (p *xlParser) scalar() (any, error) {
	if p.i >= len(p.s) {
		return nil, fmt.Errorf("missing value")
	}
	switch q := p.s[p.i]; q {
	case '"', '\'':
		end := strings.IndexByte(p.s[p.i+1:], q)
		if end < 0 {
			return nil, fmt.Errorf("unterminated string")
		}
		v := p.s[p.i+1 : p.i+1+end]
		p.i += end + 2
		if q == '"' { // xl's double-quoted strings take C escapes
			if u, err := strconv.Unquote(`"` + v + `"`); err == nil {
				v = u
			}
		}
		return v, nil
	}
	start := p.i
	for p.i < len(p.s) && p.s[p.i] >= '0' && p.s[p.i] <= '9' {
		p.i++
	}
	n, err := strconv.Atoi(p.s[start:p.i])
	if err != nil {
		return nil, fmt.Errorf("want a number, a string or a list")
	}
	return n, nil
}

// LibvirtXML is the stub domain as libvirt Xen XML, in the original
// design's form: <vtpm backend='vtpmmgr' uuid='…'/> names the manager.
func (d StubDomain) LibvirtXML() ([]byte, error) {
	return marshalXML(xenDomain{Type: "xen", Name: d.Name,
		Memory: xenMemory{Unit: "MiB", Value: stubMemoryMiB},
		OS:     xenOS{Type: "xen", Kernel: d.Kernel},
		Devices: xenDevices{
			Disks: []xenDisk{{Type: "file", Device: "disk", Source: xenSource{File: d.Image}, Target: xenTarget{Dev: "hda"}}},
			VTPMs: []xenVTPM{{Backend: d.Manager, UUID: d.UUID.String()}},
		}})
}

// GuestLibvirtXML is the device a guest's libvirt XML needs to use this
// vTPM: <vtpm backend='<stub domain name>'/>.
func (d StubDomain) GuestLibvirtXML() ([]byte, error) {
	return marshalXML(xenVTPM{Backend: d.Name})
}

func marshalXML(v any) ([]byte, error) {
	b, err := xml.MarshalIndent(v, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

type xenDomain struct {
	XMLName xml.Name   `xml:"domain"`
	Type    string     `xml:"type,attr"`
	Name    string     `xml:"name"`
	Memory  xenMemory  `xml:"memory"`
	OS      xenOS      `xml:"os"`
	Devices xenDevices `xml:"devices"`
}

type xenMemory struct {
	Unit  string `xml:"unit,attr"`
	Value int    `xml:",chardata"`
}

type xenOS struct {
	Type   string `xml:"type"`
	Kernel string `xml:"kernel"`
}

type xenDevices struct {
	Disks []xenDisk `xml:"disk"`
	VTPMs []xenVTPM `xml:"vtpm"`
}

type xenDisk struct {
	Type   string    `xml:"type,attr"`
	Device string    `xml:"device,attr"`
	Source xenSource `xml:"source"`
	Target xenTarget `xml:"target"`
}

type xenSource struct {
	File string `xml:"file,attr"`
}

type xenTarget struct {
	Dev string `xml:"dev,attr"`
}

// xenVTPM is the original design's libvirt device: for a vTPM domain the
// manager and the vTPM's UUID, for a guest the vTPM domain.
type xenVTPM struct {
	XMLName xml.Name `xml:"vtpm"`
	Backend string   `xml:"backend,attr"`
	UUID    string   `xml:"uuid,attr,omitempty"`
}
