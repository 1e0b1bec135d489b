package spec

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
)

// FuzzResolve feeds arbitrary property maps to Resolve. Whatever comes in,
// Resolve must not panic and must return either a spec that is valid by
// construction or an *Error with a known code and a one-line message, the
// same answer every time.
//
// Each map is encoded as lines of key=value; the committed corpus under
// testdata/fuzz seeds it with the interesting keys.
func FuzzResolve(f *testing.F) {
	f.Add("hw:tpm_version=2.0\nhw:tpm_model=tpm-crb", "hw_tpm_version=2.0", "", "")
	f.Add("hw:tpm_version=1.2", "hw_tpm_model=tpm-crb", "", "2.0")
	f.Add("os:vtpm=required", "hypervisor_type=hyperv\nhw_machine_type=hyperv-gen2\nos_vtpm=optional\nos_vtpm_keys="+key1, "w", "")
	f.Add("hw:tpm_secret_security=host", "", "", "1.2")
	f.Add("hw:tpm_version=1.2", "hw_tpm_version=", "", "")
	f.Add("hw:tpm_version=2.0", "hypervisor_type=XAPI\nhw_tpm_model=tpm-crb", "", "")
	f.Fuzz(func(t *testing.T, flavor, image, name, def string) {
		req := Request{FlavorName: name, FlavorSpecs: parseLines(flavor), ImageName: name, ImageProps: parseLines(image)}
		opts := Options{DefaultTPMVersion: Version(def)}
		s, err := Resolve(req, opts)
		s2, err2 := Resolve(req, opts)
		if (err == nil) != (err2 == nil) || err != nil && err.Error() != err2.Error() || !reflect.DeepEqual(s, s2) {
			t.Fatalf("not deterministic: %+v, %v vs %+v, %v", s, err, s2, err2)
		}
		if want := imageTypeCode(req.ImageProps); want != "" {
			var e *Error
			if !errors.As(err, &e) || e.Code != want {
				t.Fatalf("image %q: got %+v, %v; want %s", image, s, err, want)
			}
		}
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || !slices.Contains(allCodes, e.Code) {
				t.Fatalf("uncoded error %T %v", err, err)
			}
			if s != nil || e.Message == "" || strings.ContainsAny(e.Message, "\n\r") {
				t.Fatalf("bad refusal: spec %+v, message %q", s, e.Message)
			}
			return
		}
		if s == nil {
			if len(s.RequiredTraits()) != 0 {
				t.Fatal("no vTPM but traits required")
			}
			return
		}
		checkSpec(t, s)
	})
}

// imageTypeCode is the refusal Nova's typed image metadata gives an image
// whose hypervisor_type is absent or plainly valid: a hw_tpm_model, then a
// hw_tpm_version, that is present but outside its set; "" when there is none.
func imageTypeCode(props map[string]string) api.Code {
	if hv, ok := props[ImageHypervisorType]; ok && hv != "qemu" && hv != HyperV {
		return ""
	}
	if m, ok := props[ImageTPMModel]; ok && m != string(TIS) && m != string(CRB) {
		return api.CodeInvalidTPMModel
	}
	if v, ok := props[ImageTPMVersion]; ok && v != string(V12) && v != string(V20) {
		return api.CodeInvalidTPMVersion
	}
	return ""
}

var allCodes = []api.Code{
	api.CodeFlavorImageConflict, api.CodeInvalidTPMVersion, api.CodeInvalidTPMModel, api.CodeInvalidHypervisorType, api.CodeCRBRequiresTPM2,
	api.CodeInvalidSecretSecurity, api.CodePropertyNotSupported, api.CodeInvalidVTPMPolicy, api.CodeVTPMPolicyConflict,
	api.CodeGen2Required, api.CodeTooManyVTPMKeys, api.CodeInvalidVTPMKey, api.CodeVTPMKeysWithoutVTPM,
}

// checkSpec fails unless s is a spec a backend could build.
func checkSpec(t *testing.T, s *Spec) {
	t.Helper()
	traits := s.RequiredTraits()
	if !slices.IsSorted(traits) {
		t.Fatalf("traits not sorted: %v", traits)
	}
	if s.Hypervisor == HyperV {
		if s.Version != V20 || s.Model != "" || s.SecretSecurity != "" || s.Keys == nil || len(s.Keys) > MaxVTPMKeys {
			t.Fatalf("bad Hyper-V spec %+v", s)
		}
		for i, k := range s.Keys {
			if !isCanonicalUUID(k) || slices.Contains(s.Keys[:i], k) {
				t.Fatalf("bad key %q in %+v", k, s)
			}
		}
		return
	}
	if s.Hypervisor != "" || s.Keys != nil ||
		(s.Version != V12 && s.Version != V20) ||
		(s.Model != TIS && s.Model != CRB) || (s.Model == CRB && s.Version == V12) ||
		(s.SecretSecurity != User && s.SecretSecurity != HostMode && s.SecretSecurity != Deployment) {
		t.Fatalf("bad spec %+v", s)
	}
	if len(traits) != 3 || slices.Contains(traits, "") {
		t.Fatalf("bad traits %v for %+v", traits, s)
	}
}

func parseLines(s string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(s, "\n") {
		k, v, _ := strings.Cut(line, "=")
		m[k] = v
	}
	return m
}
