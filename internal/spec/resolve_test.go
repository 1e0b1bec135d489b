package spec

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
)

type kv = map[string]string

const (
	key1 = "0f3f5e6a-6d3e-4c43-9a65-1c0b1e0a5b11"
	key2 = "6b1c2f7e-2b1a-4a3b-8c9d-0e1f2a3b4c5d"
)

func TestResolve(t *testing.T) {
	tis20 := &Spec{Version: V20, Model: TIS, SecretSecurity: User}
	gen2 := kv{"hypervisor_type": "hyperv", "hw_machine_type": "hyperv-gen2"}
	hv := func(extra kv) kv { // a Gen2 Hyper-V image with extra properties
		m := kv{}
		for k, v := range gen2 {
			m[k] = v
		}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	hyperV := func(keys ...string) *Spec {
		return &Spec{Version: V20, Hypervisor: HyperV, Keys: append([]string{}, keys...)}
	}

	tests := []struct {
		name   string
		flavor kv
		image  kv
		opts   Options
		want   *Spec
		code   api.Code
	}{
		// libvirt/QEMU surface, rule by rule.
		{name: "nothing asked", want: nil},
		{name: "flavor version", flavor: kv{"hw:tpm_version": "2.0"}, want: tis20},
		{name: "image version", image: kv{"hw_tpm_version": "1.2"}, want: &Spec{Version: V12, Model: TIS, SecretSecurity: User}},
		{name: "same version on both", flavor: kv{"hw:tpm_version": "2.0"}, image: kv{"hw_tpm_version": "2.0"}, want: tis20},
		{name: "version conflict", flavor: kv{"hw:tpm_version": "1.2"}, image: kv{"hw_tpm_version": "2.0"}, code: api.CodeFlavorImageConflict},
		{name: "version conflict before invalid flavor version", flavor: kv{"hw:tpm_version": "3.0"}, image: kv{"hw_tpm_version": "2.0"}, code: api.CodeFlavorImageConflict},
		{name: "invalid flavor version", flavor: kv{"hw:tpm_version": "3.0"}, code: api.CodeInvalidTPMVersion},
		{name: "invalid image version", image: kv{"hw_tpm_version": "2"}, code: api.CodeInvalidTPMVersion},
		{name: "version is case and space sensitive", flavor: kv{"hw:tpm_version": " 2.0"}, code: api.CodeInvalidTPMVersion},
		{name: "empty version is unset", flavor: kv{"hw:tpm_version": ""}, image: kv{"hw_tpm_version": "2.0"}, want: tis20},
		{name: "empty flavor version alone is no vTPM", flavor: kv{"hw:tpm_version": ""}, want: nil},
		{name: "empty flavor model is unset", flavor: kv{"hw:tpm_version": "2.0", "hw:tpm_model": ""}, want: tis20},
		{name: "model ignored without version", flavor: kv{"hw:tpm_model": "tpm-crb"}, image: kv{"hw_tpm_model": "tpm-tis"}, want: nil},
		{name: "invalid model ignored without version", flavor: kv{"hw:tpm_model": "nonsense"}, want: nil},
		{name: "invalid secret security ignored without vTPM", flavor: kv{"hw:tpm_secret_security": "nonsense"}, want: nil},
		{name: "flavor model", flavor: kv{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}, want: &Spec{Version: V20, Model: CRB, SecretSecurity: User}},
		{name: "mixed sources: flavor version, image model", flavor: kv{"hw:tpm_version": "2.0"}, image: kv{"hw_tpm_model": "tpm-crb"}, want: &Spec{Version: V20, Model: CRB, SecretSecurity: User}},
		{name: "mixed sources: image version, flavor model", flavor: kv{"hw:tpm_model": "tpm-crb"}, image: kv{"hw_tpm_version": "2.0"}, want: &Spec{Version: V20, Model: CRB, SecretSecurity: User}},
		{name: "model conflict", flavor: kv{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}, image: kv{"hw_tpm_model": "tpm-tis"}, code: api.CodeFlavorImageConflict},
		{name: "model conflict before invalid flavor model", flavor: kv{"hw:tpm_version": "2.0", "hw:tpm_model": "x"}, image: kv{"hw_tpm_model": "tpm-tis"}, code: api.CodeFlavorImageConflict},
		{name: "invalid version before model conflict", flavor: kv{"hw:tpm_version": "9", "hw:tpm_model": "tpm-crb"}, image: kv{"hw_tpm_model": "tpm-tis"}, code: api.CodeInvalidTPMVersion},
		{name: "invalid model", image: kv{"hw_tpm_version": "2.0", "hw_tpm_model": "TPM-CRB"}, code: api.CodeInvalidTPMModel},
		{name: "crb with 1.2", flavor: kv{"hw:tpm_version": "1.2", "hw:tpm_model": "tpm-crb"}, code: api.CodeCRBRequiresTPM2},
		{name: "crb with 1.2 from different sources", flavor: kv{"hw:tpm_model": "tpm-crb"}, image: kv{"hw_tpm_version": "1.2"}, code: api.CodeCRBRequiresTPM2},
		{name: "tis with 1.2", flavor: kv{"hw:tpm_version": "1.2", "hw:tpm_model": "tpm-tis"}, want: &Spec{Version: V12, Model: TIS, SecretSecurity: User}},
		{name: "secret security host", flavor: kv{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host"}, want: &Spec{Version: V20, Model: TIS, SecretSecurity: HostMode}},
		{name: "secret security deployment", flavor: kv{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "deployment"}, want: &Spec{Version: V20, Model: TIS, SecretSecurity: Deployment}},
		{name: "secret security from flavor when image asks", flavor: kv{"hw:tpm_secret_security": "host"}, image: kv{"hw_tpm_version": "2.0"}, want: &Spec{Version: V20, Model: TIS, SecretSecurity: HostMode}},
		{name: "invalid secret security", flavor: kv{"hw:tpm_version": "2.0", "hw:tpm_secret_security": "User"}, code: api.CodeInvalidSecretSecurity},
		{name: "secret security is flavor only", flavor: kv{"hw:tpm_version": "2.0"}, image: kv{"hw_tpm_secret_security": "host"}, want: tis20},
		{name: "crb before secret security", flavor: kv{"hw:tpm_version": "1.2", "hw:tpm_model": "tpm-crb", "hw:tpm_secret_security": "x"}, code: api.CodeCRBRequiresTPM2},

		// Image properties are typed before any rule, as Nova builds its
		// ImageMeta object first: an image value outside its set, the empty
		// string included, is refused; only the flavor side has "empty is unset".
		{name: "invalid image model alone", image: kv{"hw_tpm_model": "bogus"}, code: api.CodeInvalidTPMModel},
		{name: "empty image model alone", image: kv{"hw_tpm_model": ""}, code: api.CodeInvalidTPMModel},
		{name: "empty image model with flavor version", flavor: kv{"hw:tpm_version": "2.0"}, image: kv{"hw_tpm_model": ""}, code: api.CodeInvalidTPMModel},
		{name: "empty image version alone", image: kv{"hw_tpm_version": ""}, code: api.CodeInvalidTPMVersion},
		{name: "empty image version with flavor version", flavor: kv{"hw:tpm_version": "1.2"}, image: kv{"hw_tpm_version": ""}, code: api.CodeInvalidTPMVersion},
		{name: "empty image version with empty flavor version", flavor: kv{"hw:tpm_version": ""}, image: kv{"hw_tpm_version": ""}, code: api.CodeInvalidTPMVersion},
		{name: "invalid image version before version conflict", flavor: kv{"hw:tpm_version": "1.2"}, image: kv{"hw_tpm_version": "2"}, code: api.CodeInvalidTPMVersion},
		{name: "invalid image version before invalid flavor version", flavor: kv{"hw:tpm_version": "3.0"}, image: kv{"hw_tpm_version": "bogus"}, code: api.CodeInvalidTPMVersion},
		{name: "invalid image model before model conflict", flavor: kv{"hw:tpm_version": "2.0", "hw:tpm_model": "x"}, image: kv{"hw_tpm_model": "y"}, code: api.CodeInvalidTPMModel},
		{name: "invalid image model before version conflict", flavor: kv{"hw:tpm_version": "1.2"}, image: kv{"hw_tpm_version": "2.0", "hw_tpm_model": "tpm-crb "}, code: api.CodeInvalidTPMModel},
		{name: "invalid image model before invalid image version", image: kv{"hw_tpm_version": "bogus", "hw_tpm_model": "bogus"}, code: api.CodeInvalidTPMModel},
		{name: "invalid image version with a deployment default", image: kv{"hw_tpm_version": ""}, opts: Options{DefaultTPMVersion: V20}, code: api.CodeInvalidTPMVersion},
		{name: "image typing before the surface check", image: kv{"os_vtpm": "required", "hw_tpm_version": ""}, code: api.CodeInvalidTPMVersion},

		// hypervisor_type is typed too, as Nova's HVType: lowercased, xapi
		// read as xen, anything else outside Nova's list refused.
		{name: "invalid hypervisor_type", image: kv{"hypervisor_type": "bogus"}, code: api.CodeInvalidHypervisorType},
		{name: "empty hypervisor_type", flavor: kv{"hw:tpm_version": "2.0"}, image: kv{"hypervisor_type": ""}, code: api.CodeInvalidHypervisorType},
		{name: "hypervisor_type before the TPM properties", image: kv{"hypervisor_type": "kvm ", "hw_tpm_model": "bogus"}, code: api.CodeInvalidHypervisorType},
		{name: "hypervisor_type of another hypervisor", flavor: kv{"hw:tpm_version": "2.0"}, image: kv{"hypervisor_type": "VMware"}, want: tis20},
		{name: "hypervisor_type xapi is xen", flavor: kv{"hw:tpm_version": "2.0"}, image: kv{"hypervisor_type": "xapi"}, want: tis20},
		{name: "hypervisor_type Kelvin sign lowers to k", flavor: kv{"hw:tpm_version": "2.0"}, image: kv{"hypervisor_type": "\u212avm"}, want: tis20},
		{name: "hypervisor_type dotted capital I lowers to two runes", flavor: kv{"hw:tpm_version": "2.0"}, image: kv{"hypervisor_type": "\u0130ronic"}, code: api.CodeInvalidHypervisorType},

		// The deployment default.
		{name: "default applies", opts: Options{DefaultTPMVersion: V20}, want: tis20},
		{name: "default with image model", image: kv{"hw_tpm_model": "tpm-crb"}, opts: Options{DefaultTPMVersion: V20}, want: &Spec{Version: V20, Model: CRB, SecretSecurity: User}},
		{name: "default 1.2 with crb", image: kv{"hw_tpm_model": "tpm-crb"}, opts: Options{DefaultTPMVersion: V12}, code: api.CodeCRBRequiresTPM2},
		{name: "flavor beats default", flavor: kv{"hw:tpm_version": "1.2"}, opts: Options{DefaultTPMVersion: V20}, want: &Spec{Version: V12, Model: TIS, SecretSecurity: User}},
		{name: "image beats default", image: kv{"hw_tpm_version": "1.2"}, opts: Options{DefaultTPMVersion: V20}, want: &Spec{Version: V12, Model: TIS, SecretSecurity: User}},
		{name: "invalid default", opts: Options{DefaultTPMVersion: "2"}, code: api.CodeInvalidTPMVersion},
		{name: "default does not apply to Hyper-V", image: gen2, opts: Options{DefaultTPMVersion: V20}, want: nil},

		// Surface checks.
		{name: "os_vtpm off Hyper-V", image: kv{"os_vtpm": "required"}, code: api.CodePropertyNotSupported},
		{name: "os:vtpm off Hyper-V", flavor: kv{"os:vtpm": "required"}, code: api.CodePropertyNotSupported},
		{name: "os_vtpm_keys off Hyper-V", image: kv{"hypervisor_type": "qemu", "os_vtpm_keys": key1}, code: api.CodePropertyNotSupported},
		{name: "surface check before version conflict", flavor: kv{"hw:tpm_version": "1.2", "os:vtpm": "required"}, image: kv{"hw_tpm_version": "2.0"}, code: api.CodePropertyNotSupported},
		{name: "hypervisor_type is lowercased", flavor: kv{"hw:tpm_version": "2.0"}, image: kv{"hypervisor_type": "HyperV"}, code: api.CodePropertyNotSupported},
		{name: "hypervisor_type HYPERV is Hyper-V", image: kv{"hypervisor_type": "HYPERV", "hw_machine_type": "hyperv-gen2", "os_vtpm": "required"}, want: hyperV()},
		{name: "hw:tpm on Hyper-V", flavor: kv{"hw:tpm_version": "2.0"}, image: hv(kv{"os_vtpm": "required"}), code: api.CodePropertyNotSupported},
		{name: "hw_tpm on Hyper-V", image: hv(kv{"hw_tpm_model": "tpm-crb"}), code: api.CodePropertyNotSupported},
		{name: "unknown hw:tpm_ key on Hyper-V", flavor: kv{"hw:tpm_anything": "x"}, image: gen2, code: api.CodePropertyNotSupported},
		{name: "empty hw:tpm on Hyper-V is unset", flavor: kv{"hw:tpm_version": ""}, image: hv(kv{"os_vtpm": "required"}), want: hyperV()},
		{name: "empty hw_tpm on Hyper-V is invalid", image: hv(kv{"os_vtpm": "required", "hw_tpm_version": ""}), code: api.CodeInvalidTPMVersion},
		{name: "invalid hw_tpm on Hyper-V before not supported", flavor: kv{"hw:tpm_model": "tpm-crb"}, image: hv(kv{"hw_tpm_model": "bogus"}), code: api.CodeInvalidTPMModel},
		{name: "unknown hw_tpm_ property on Hyper-V is not typed", image: hv(kv{"hw_tpm_secret_security": ""}), want: nil},

		// Hyper-V policy table: image × flavor.
		{name: "hv unset/unset", image: gen2, want: nil},
		{name: "hv unset/disabled", flavor: kv{"os:vtpm": "disabled"}, image: gen2, want: nil},
		{name: "hv unset/optional", flavor: kv{"os:vtpm": "optional"}, image: gen2, want: nil},
		{name: "hv unset/required", flavor: kv{"os:vtpm": "required"}, image: gen2, code: api.CodeVTPMPolicyConflict},
		{name: "hv disabled/unset", image: hv(kv{"os_vtpm": "disabled"}), want: nil},
		{name: "hv disabled/disabled", flavor: kv{"os:vtpm": "disabled"}, image: hv(kv{"os_vtpm": "disabled"}), want: nil},
		{name: "hv disabled/optional", flavor: kv{"os:vtpm": "optional"}, image: hv(kv{"os_vtpm": "disabled"}), want: nil},
		{name: "hv disabled/required", flavor: kv{"os:vtpm": "required"}, image: hv(kv{"os_vtpm": "disabled"}), code: api.CodeVTPMPolicyConflict},
		{name: "hv optional/unset", image: hv(kv{"os_vtpm": "optional"}), want: nil},
		{name: "hv optional/disabled", flavor: kv{"os:vtpm": "disabled"}, image: hv(kv{"os_vtpm": "optional"}), want: nil},
		{name: "hv optional/optional", flavor: kv{"os:vtpm": "optional"}, image: hv(kv{"os_vtpm": "optional"}), want: nil},
		{name: "hv optional/required", flavor: kv{"os:vtpm": "required"}, image: hv(kv{"os_vtpm": "optional"}), want: hyperV()},
		{name: "hv required/unset", image: hv(kv{"os_vtpm": "required"}), want: hyperV()},
		{name: "hv required/disabled", flavor: kv{"os:vtpm": "disabled"}, image: hv(kv{"os_vtpm": "required"}), code: api.CodeVTPMPolicyConflict},
		{name: "hv required/optional", flavor: kv{"os:vtpm": "optional"}, image: hv(kv{"os_vtpm": "required"}), want: hyperV()},
		{name: "hv required/required", flavor: kv{"os:vtpm": "required"}, image: hv(kv{"os_vtpm": "required"}), want: hyperV()},
		{name: "hv invalid image policy", image: hv(kv{"os_vtpm": "Required"}), code: api.CodeInvalidVTPMPolicy},
		{name: "hv invalid flavor policy", flavor: kv{"os:vtpm": "yes"}, image: hv(kv{"os_vtpm": "required"}), code: api.CodeInvalidVTPMPolicy},
		{name: "hv invalid policy before conflict", flavor: kv{"os:vtpm": "yes"}, image: hv(kv{"os_vtpm": "disabled"}), code: api.CodeInvalidVTPMPolicy},

		// Generation 2.
		{name: "hv needs gen2", image: kv{"hypervisor_type": "hyperv", "os_vtpm": "required"}, code: api.CodeGen2Required},
		{name: "hv gen1 machine", image: kv{"hypervisor_type": "hyperv", "hw_machine_type": "hyperv-gen1", "os_vtpm": "required"}, code: api.CodeGen2Required},
		{name: "hv no vTPM needs no gen2", image: kv{"hypervisor_type": "hyperv"}, want: nil},

		// os_vtpm_keys.
		{name: "hv keys", image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": key1 + "," + key2}), want: hyperV(key1, key2)},
		{name: "hv keys lowercased and trimmed", image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": strings.ToUpper(key1) + ", " + key2}), want: hyperV(key1, key2)},
		{name: "hv six keys", image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": keys(6)}), want: hyperV(strings.Split(keys(6), ",")...)},
		{name: "hv seven keys", image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": keys(7)}), code: api.CodeTooManyVTPMKeys},
		{name: "hv too many before invalid", image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": ",,,,,,"}), code: api.CodeTooManyVTPMKeys},
		{name: "hv empty key entry", image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": key1 + ","}), code: api.CodeInvalidVTPMKey},
		{name: "hv blank key entry", image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": key1 + ", ," + key2}), code: api.CodeInvalidVTPMKey},
		{name: "hv non-uuid key", image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": "not-a-uuid"}), code: api.CodeInvalidVTPMKey},
		{name: "hv uuid without hyphens", image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": strings.ReplaceAll(key1, "-", "")}), code: api.CodeInvalidVTPMKey},
		{name: "hv braced uuid", image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": "{" + key1 + "}"}), code: api.CodeInvalidVTPMKey},
		{name: "hv repeated key", image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": key1 + "," + key1}), code: api.CodeInvalidVTPMKey},
		{name: "hv keys without vTPM", image: hv(kv{"os_vtpm_keys": key1}), code: api.CodeVTPMKeysWithoutVTPM},
		{name: "hv keys with optional and no flavor", image: hv(kv{"os_vtpm": "optional", "os_vtpm_keys": key1}), code: api.CodeVTPMKeysWithoutVTPM},
		{name: "hv keys with optional and flavor required", flavor: kv{"os:vtpm": "required"}, image: hv(kv{"os_vtpm": "optional", "os_vtpm_keys": key1}), want: hyperV(key1)},
		{name: "hv invalid key before keys without vTPM", image: hv(kv{"os_vtpm_keys": "x"}), code: api.CodeInvalidVTPMKey},
		{name: "hv conflict before key checks", flavor: kv{"os:vtpm": "disabled"}, image: hv(kv{"os_vtpm": "required", "os_vtpm_keys": "x"}), code: api.CodeVTPMPolicyConflict},
		{name: "hv keys checked before gen2", image: kv{"hypervisor_type": "hyperv", "os_vtpm": "required", "os_vtpm_keys": "x"}, code: api.CodeInvalidVTPMKey},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Resolve(Request{FlavorName: "m1.small", FlavorSpecs: tc.flavor, ImageName: "win11", ImageProps: tc.image}, tc.opts)
			if tc.code != "" {
				var e *Error
				if !errors.As(err, &e) {
					t.Fatalf("Resolve = %+v, %v; want error %s", got, err, tc.code)
				}
				if e.Code != tc.code {
					t.Fatalf("code = %s (%s); want %s", e.Code, e.Message, tc.code)
				}
				if got != nil || e.Message == "" {
					t.Fatalf("refusal with spec %+v or empty message %q", got, e.Message)
				}
				return
			}
			if err != nil {
				t.Fatalf("Resolve: %v; want %+v", err, tc.want)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("Resolve = %+v; want %+v", got, tc.want)
			}
		})
	}
}

// keys returns n distinct UUIDs joined by commas.
func keys(n int) string {
	var ks []string
	for i := range n {
		ks = append(ks, strings.Replace(key1, "0f", string(rune('a'+i))+"0", 1))
	}
	return strings.Join(ks, ",")
}

func TestResolveMessages(t *testing.T) {
	tests := []struct {
		name string
		req  Request
		opts Options
		want string
	}{
		{
			name: "version conflict names both sides",
			req:  Request{FlavorName: "m1.small", FlavorSpecs: kv{"hw:tpm_version": "1.2"}, ImageName: "win11", ImageProps: kv{"hw_tpm_version": "2.0"}},
			want: "Flavor m1.small has hw:tpm_version extra spec explicitly set to 1.2, conflicting with image win11 which has hw_tpm_version explicitly set to 2.0.",
		},
		{
			name: "model conflict without names",
			req:  Request{FlavorSpecs: kv{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}, ImageProps: kv{"hw_tpm_model": "tpm-tis"}},
			want: "The flavor has hw:tpm_model extra spec explicitly set to tpm-crb, conflicting with the image which has hw_tpm_model explicitly set to tpm-tis.",
		},
		{
			name: "invalid image version",
			req:  Request{ImageName: "cirros", ImageProps: kv{"hw_tpm_version": "3.0"}},
			want: "Image cirros has hw_tpm_version property set to 3.0, which is not a valid TPM version (expected 1.2 or 2.0).",
		},
		{
			name: "empty image version is quoted",
			req:  Request{FlavorName: "m1", FlavorSpecs: kv{"hw:tpm_version": "1.2"}, ImageName: "cirros", ImageProps: kv{"hw_tpm_version": ""}},
			want: `Image cirros has hw_tpm_version property set to "", which is not a valid TPM version (expected 1.2 or 2.0).`,
		},
		{
			name: "invalid image model",
			req:  Request{ImageName: "cirros", ImageProps: kv{"hw_tpm_model": "bogus"}},
			want: "Image cirros has hw_tpm_model property set to bogus, which is not a valid TPM model (expected tpm-tis or tpm-crb).",
		},
		{
			name: "invalid hypervisor type",
			req:  Request{ImageName: "cirros", ImageProps: kv{"hypervisor_type": "kvm2"}},
			want: "Image cirros has hypervisor_type property set to kvm2, which is not a valid hypervisor type (expected one of " + strings.Join(hypervisorTypes, ", ") + ", in any case, or xapi for xen).",
		},
		{
			name: "invalid default",
			opts: Options{DefaultTPMVersion: "2"},
			want: "The deployment setting default_tpm_version is 2, which is not a valid TPM version (expected 1.2 or 2.0).",
		},
		{
			name: "crb names both sources",
			req:  Request{FlavorName: "m1", FlavorSpecs: kv{"hw:tpm_model": "tpm-crb"}, ImageName: "old", ImageProps: kv{"hw_tpm_version": "1.2"}},
			want: "Flavor m1 has hw:tpm_model extra spec set to tpm-crb, which needs TPM version 2.0, but image old has hw_tpm_version property set to 1.2.",
		},
		{
			name: "hostile value is quoted and cut",
			req:  Request{FlavorName: "f", FlavorSpecs: kv{"hw:tpm_version": "2.0\n" + strings.Repeat("x", 100)}},
			want: `Flavor f has hw:tpm_version extra spec set to "2.0\n` + strings.Repeat("x", 60) + `"..., which is not a valid TPM version (expected 1.2 or 2.0).`,
		},
		{
			name: "policy conflict with unset image",
			req:  Request{FlavorName: "shielded", FlavorSpecs: kv{"os:vtpm": "required"}, ImageName: "win", ImageProps: kv{"hypervisor_type": "hyperv"}},
			want: "Flavor shielded has os:vtpm extra spec set to required, conflicting with image win which has os_vtpm not set, which means disabled.",
		},
		{
			name: "gen2",
			req:  Request{ImageName: "win", ImageProps: kv{"hypervisor_type": "hyperv", "os_vtpm": "required"}},
			want: "A Hyper-V vTPM needs a Generation 2 VM, but image win has hw_machine_type not set; set hw_machine_type=hyperv-gen2.",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Resolve(tc.req, tc.opts)
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("Resolve error = %v; want *Error", err)
			}
			if e.Message != tc.want {
				t.Fatalf("message:\n got %s\nwant %s", e.Message, tc.want)
			}
		})
	}
}

// TestResolveDeterministic: with several offending keys, the refusal names
// the same one every time, whatever the map iteration order.
func TestResolveDeterministic(t *testing.T) {
	req := Request{
		FlavorSpecs: kv{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb", "hw:tpm_secret_security": "host", "hw:tpm_zzz": "1"},
		ImageProps:  kv{"hypervisor_type": "hyperv", "hw_tpm_version": "2.0"},
	}
	_, first := Resolve(req, Options{})
	if !strings.Contains(first.Error(), "hw:tpm_model") {
		t.Fatalf("want the smallest offending key named, got %v", first)
	}
	for range 50 {
		if _, err := Resolve(req, Options{}); err.Error() != first.Error() {
			t.Fatalf("refusal changed between runs:\n%v\n%v", first, err)
		}
	}
}
