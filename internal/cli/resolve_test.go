package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
)

// run executes vtpmctl with args and returns its exit status and streams.
func run(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := Main(context.Background(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestResolveCommand(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string // exact JSON on stdout
	}{
		{"no vTPM", nil, `{"vtpm":null,"required_traits":[]}`},
		{"crb 2.0", []string{"--flavor-spec", "hw:tpm_version=2.0", "--image-prop", "hw_tpm_model=tpm-crb"},
			`{"vtpm":{"version":"2.0","model":"tpm-crb","secret_security":"user"},"required_traits":["COMPUTE_SECURITY_TPM_2_0","COMPUTE_SECURITY_TPM_CRB","COMPUTE_SECURITY_TPM_SECRET_SECURITY_USER"]}`},
		{"default version", []string{"--default-tpm-version", "1.2", "--flavor-spec", "hw:tpm_secret_security=host", "-o", "json"},
			`{"vtpm":{"version":"1.2","model":"tpm-tis","secret_security":"host"},"required_traits":["COMPUTE_SECURITY_TPM_1_2","COMPUTE_SECURITY_TPM_SECRET_SECURITY_HOST","COMPUTE_SECURITY_TPM_TIS"]}`},
		{"hyper-v keys keep their commas", []string{"--image-prop", "hypervisor_type=hyperv", "--image-prop", "hw_machine_type=hyperv-gen2",
			"--image-prop", "os_vtpm=required", "--image-prop", "os_vtpm_keys=0f3f5e6a-6d3e-4c43-9a65-1c0b1e0a5b11,6B1C2F7E-2B1A-4A3B-8C9D-0E1F2A3B4C5D"},
			`{"vtpm":{"version":"2.0","model":null,"hypervisor":"hyperv","keys":["0f3f5e6a-6d3e-4c43-9a65-1c0b1e0a5b11","6b1c2f7e-2b1a-4a3b-8c9d-0e1f2a3b4c5d"]},"required_traits":["COMPUTE_SECURITY_TPM_2_0","CUSTOM_HYPERV_GEN2_VTPM"]}`},
		{"hyper-v without keys", []string{"--image-prop", "hypervisor_type=hyperv", "--image-prop", "hw_machine_type=hyperv-gen2", "--image-prop", "os_vtpm=optional", "--flavor-spec", "os:vtpm=required"},
			`{"vtpm":{"version":"2.0","model":null,"hypervisor":"hyperv","keys":[]},"required_traits":["COMPUTE_SECURITY_TPM_2_0","CUSTOM_HYPERV_GEN2_VTPM"]}`},
		{"value with equals sign", []string{"--flavor-spec", "hw:tpm_version=2.0", "--flavor-spec", "other=a=b"},
			`{"vtpm":{"version":"2.0","model":"tpm-tis","secret_security":"user"},"required_traits":["COMPUTE_SECURITY_TPM_2_0","COMPUTE_SECURITY_TPM_SECRET_SECURITY_USER","COMPUTE_SECURITY_TPM_TIS"]}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := run(t, append([]string{"resolve"}, tc.args...)...)
			if code != ExitOK || errOut != "" {
				t.Fatalf("exit %d, stderr %q", code, errOut)
			}
			var compact bytes.Buffer
			if err := json.Compact(&compact, []byte(out)); err != nil {
				t.Fatalf("stdout is not JSON: %v\n%s", err, out)
			}
			if compact.String() != tc.want {
				t.Fatalf("stdout:\n got %s\nwant %s", compact.String(), tc.want)
			}
		})
	}
}

func TestResolveRefused(t *testing.T) {
	code, out, errOut := run(t, "resolve", "--flavor-name", "m1.small", "--flavor-spec", "hw:tpm_version=1.2",
		"--image-name", "win11", "--image-prop", "hw_tpm_version=2.0")
	if code != ExitFailed || errOut != "" {
		t.Fatalf("exit %d, stderr %q; want 1 and nothing", code, errOut)
	}
	var body api.ErrorBody
	if err := json.Unmarshal([]byte(out), &body); err != nil {
		t.Fatalf("stdout is not an error body: %v\n%s", err, out)
	}
	want := api.Error{Code: api.CodeFlavorImageConflict, Message: "Flavor m1.small has hw:tpm_version extra spec explicitly set to 1.2, conflicting with image win11 which has hw_tpm_version explicitly set to 2.0."}
	if body.Error != want {
		t.Fatalf("error = %+v; want %+v", body.Error, want)
	}

	// An empty image property is given, not unset: refused before the
	// flavor's version is used.
	code, out, errOut = run(t, "resolve", "--flavor-spec", "hw:tpm_version=1.2", "--image-name", "cirros", "--image-prop", "hw_tpm_version=")
	want = api.Error{Code: api.CodeInvalidTPMVersion, Message: `Image cirros has hw_tpm_version property set to "", which is not a valid TPM version (expected 1.2 or 2.0).`}
	body = api.ErrorBody{}
	if err := json.Unmarshal([]byte(out), &body); code != ExitFailed || err != nil || body.Error != want {
		t.Fatalf("empty image version: exit %d, stdout %q, stderr %q; want %+v", code, out, errOut, want)
	}

	// In table mode the refusal goes to stderr, still with its code.
	code, out, errOut = run(t, "resolve", "-o", "table", "--image-prop", "hw_tpm_version=3")
	if code != ExitFailed || out != "" || !strings.Contains(errOut, "invalid_tpm_version: ") {
		t.Fatalf("table refusal: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

func TestResolveUsage(t *testing.T) {
	for _, args := range [][]string{
		{"resolve", "--flavor-spec", "hw:tpm_version"},
		{"resolve", "--image-prop", "=2.0"},
		{"resolve", "--flavor-spec", "hw:tpm_version=2.0", "--flavor-spec", "hw:tpm_version=1.2"},
		{"resolve", "--default-tpm-version", "3"},
		{"resolve", "-o", "yaml"},
		{"resolve", "--no-such-flag"},
		{"resolve", "extra-arg"},
		{"no-such-command"},
	} {
		code, out, errOut := run(t, args...)
		if code != ExitUsage || out != "" || !strings.Contains(errOut, "--help' for usage") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want usage error", args, code, out, errOut)
		}
	}
}

func TestResolveTable(t *testing.T) {
	code, out, _ := run(t, "resolve", "-o", "table", "--flavor-spec", "hw:tpm_version=2.0", "--flavor-spec", "hw:tpm_model=tpm-crb")
	if code != ExitOK {
		t.Fatalf("exit %d", code)
	}
	got := strings.Fields(out)
	want := strings.Fields(`VERSION 2.0 MODEL tpm-crb SECRET SECURITY user HYPERVISOR libvirt/qemu KEYS -
		REQUIRED TRAITS COMPUTE_SECURITY_TPM_2_0,COMPUTE_SECURITY_TPM_CRB,COMPUTE_SECURITY_TPM_SECRET_SECURITY_USER`)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("table:\n%s", out)
	}
}
