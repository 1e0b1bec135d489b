package xen

import (
	"bytes"
	"encoding/xml"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/google/uuid"
)

var update = flag.Bool("update", false, "rewrite the golden files")

const instance = "3f1e0a52-7c1b-4d25-9a5e-0c7d2b9e4a11"

var vtpmUUIDFixed = uuid.MustParse("698416c2-615f-4ffa-9a55-c04f76966b06")

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", "golden", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the golden file:\n%s\nwant:\n%s", name, got, want)
	}
}

// Every configuration shape, for the original's layout and a custom one.
func TestConfigGolden(t *testing.T) {
	for name, layout := range map[string]Layout{
		"default": {},
		"custom":  {ImageDir: "/srv/vtpm/images", ConfigDir: "/etc/xen/vtpm", Kernel: "/boot/vtpm-stubdom.gz", Manager: "mgr0"},
	} {
		d := layout.StubDomain(instance, vtpmUUIDFixed)
		stub, err := d.LibvirtXML()
		if err != nil {
			t.Fatal(err)
		}
		guest, err := d.GuestLibvirtXML()
		if err != nil {
			t.Fatal(err)
		}
		golden(t, name+"-stubdom.cfg", d.XL())
		golden(t, name+"-guest.cfg", d.GuestXL())
		golden(t, name+"-stubdom.xml", stub)
		golden(t, name+"-guest.xml", guest)
		for _, doc := range [][]byte{stub, guest} {
			if err := xml.Unmarshal(doc, new(struct{})); err != nil {
				t.Errorf("%s: not XML: %v", name, err)
			}
		}
	}
}

// The generated xl configuration reads back as what was meant.
func TestParseGeneratedXL(t *testing.T) {
	d := Layout{}.StubDomain(instance, vtpmUUIDFixed)
	got, err := ParseXL(d.XL())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"name":   "vtpm-" + instance,
		"kernel": "/usr/lib/xen/boot/vtpm-stubdom.gz",
		"memory": 8,
		"disk":   []string{"file:/var/lib/xen/images/nova_vtpms/vtpm-" + instance + ".img,hda,w"},
		"vtpm":   []string{"backend=vtpmmgr,uuid=698416c2-615f-4ffa-9a55-c04f76966b06"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("parsed %#v\nwant %#v", got, want)
	}
	if id, err := vtpmUUID(d.XL()); err != nil || id != vtpmUUIDFixed {
		t.Fatalf("vtpm uuid: %v %v", id, err)
	}
	guest, err := ParseXL(d.GuestXL())
	if err != nil || !reflect.DeepEqual(guest["vtpm"], []string{"backend=vtpm-" + instance}) {
		t.Fatalf("guest line: %#v %v", guest, err)
	}
}

// The parser reads the original design's hand-written configurations.
func TestParseOriginalXL(t *testing.T) {
	for file, want := range map[string]map[string]any{
		"seed-vtpmmgr.cfg": {"name": "vtpmmgr", "extra": "loglevel=debug", "kernel": "/var/lib/xen/vtpm-kernel/vtpmmgr-46-stubdom.gz",
			"memory": 8, "disk": []string{"file:/var/lib/xen/images/vtpmmgr.img,hda,w"}, "iomem": []string{"fed40,5"}},
		"seed-uuid-server.cfg": {"name": "uuid_server", "vcpus": "4", "memory": 2048, "disk": []string{"file:/var/lib/xen/images/uuid_server.img,xvda,w"},
			"vif": []string{"bridge=virbr0 "}, "kernel": "/usr/lib/grub-xen/grub-x86_64-xen.bin", "vtpm": []string{"backend=uuid-vtpm"}},
	} {
		data, err := os.ReadFile(filepath.Join("testdata", file))
		if err != nil {
			t.Fatal(err)
		}
		got, err := ParseXL(data)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %#v %v", file, got, err)
		}
	}
	for _, bad := range []string{"name", "= 1", `name = "open`, "memory = 8x", "disk = [1 2]", "vtpm = ['a'", "name = ", "9x = 1"} {
		if _, err := ParseXL([]byte(bad)); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}
