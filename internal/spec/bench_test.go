package spec

import (
	"fmt"
	"testing"
)

// BenchmarkResolve measures resolution plus required traits per request,
// the work the API does for every create (target: ≤ 2 µs).
func BenchmarkResolve(b *testing.B) {
	cases := []struct {
		name string
		req  Request
	}{
		{"libvirt", Request{FlavorName: "m1.small", FlavorSpecs: kv{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host", "hw:cpu_policy": "dedicated"},
			ImageName: "win11", ImageProps: kv{"hw_tpm_model": "tpm-crb", "hw_machine_type": "q35", "os_type": "windows"}}},
		{"none", Request{FlavorName: "m1.small", FlavorSpecs: kv{"hw:cpu_policy": "dedicated"}, ImageName: "cirros", ImageProps: kv{"os_type": "linux"}}},
		{"hyperv", Request{FlavorName: "shielded", FlavorSpecs: kv{"os:vtpm": "required"}, ImageName: "win",
			ImageProps: kv{"hypervisor_type": "hyperv", "hw_machine_type": "hyperv-gen2", "os_vtpm": "optional", "os_vtpm_keys": key1 + "," + key2}}},
		{"refused", Request{FlavorName: "m1.small", FlavorSpecs: kv{"hw:tpm_version": "1.2"}, ImageName: "win11", ImageProps: kv{"hw_tpm_version": "2.0"}}},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			// Only "refused" is: a case resolving otherwise than meant
			// would time the wrong path.
			if _, err := Resolve(c.req, Options{}); (err != nil) != (c.name == "refused") {
				b.Fatalf("%s resolves with %v", c.name, err)
			}
			b.ReportAllocs()
			for b.Loop() {
				s, _ := Resolve(c.req, Options{})
				_ = s.RequiredTraits()
			}
		})
	}
}

// BenchmarkPlace measures one placement over a fleet of 10,000 hosts, each
// with Nova-like trait lists (target: ≤ 5 ms).
func BenchmarkPlace(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		hosts := make([]Host, n)
		for i := range hosts {
			caps := Capabilities{Enabled: i%10 != 0, Models: []Model{TIS}}
			if i%2 == 0 {
				caps.Models = append(caps.Models, CRB)
			}
			traits := append(HostTraits(caps).List(),
				"COMPUTE_NET_ATTACH_INTERFACE", "COMPUTE_VOLUME_MULTI_ATTACH", "COMPUTE_IMAGE_TYPE_QCOW2",
				"HW_CPU_X86_AVX2", "HW_CPU_X86_AES", "COMPUTE_STATUS_DISABLED", "CUSTOM_RACK_"+fmt.Sprint(i%40))
			hosts[i] = Host{Name: fmt.Sprintf("compute-%05d", i), Traits: NewTraitSet(traits...), Free: (i * 7919) % 64, State: HostUp}
		}
		req := (&Spec{Version: V20, Model: CRB, SecretSecurity: Deployment}).RequiredTraits()
		b.Run(fmt.Sprintf("hosts=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Place(hosts, req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
