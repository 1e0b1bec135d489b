package spec

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/vtpmd/vtpmd/api"
)

// Resolve turns a request into the vTPM it asks for: a Spec, nil when the
// request asks for no vTPM, or an *Error carrying a stable Code. The rules
// and their order are in the package documentation.
func Resolve(r Request, opts Options) (*Spec, error) {
	hv, err := r.typeImage()
	if err != nil {
		return nil, err
	}
	if hv == HyperV {
		return resolveHyperV(r)
	}
	return resolveLibvirt(r, opts)
}

// typeImage refuses what Nova refuses while building its typed image
// metadata (ImageMetaProps.from_dict), before any vTPM rule: a
// hypervisor_type, hw_tpm_model or hw_tpm_version that is present but
// outside its type, the empty string included, checked in Nova's order
// (the legacy name hypervisor_type first, then the fields as declared). It
// returns the canonical hypervisor type, "" when the image sets none.
func (r *Request) typeImage() (string, error) {
	hv, ok := r.ImageProps[ImageHypervisorType]
	if ok {
		hv = canonicalHypervisorType(hv)
		if !slices.Contains(hypervisorTypes, hv) {
			return "", r.invalid(api.CodeInvalidHypervisorType, r.image(ImageHypervisorType), "hypervisor type",
				"one of "+strings.Join(hypervisorTypes, ", ")+", in any case, or xapi for xen")
		}
	}
	if m, ok := r.ImageProps[ImageTPMModel]; ok && Model(m) != TIS && Model(m) != CRB {
		return "", r.invalid(api.CodeInvalidTPMModel, r.image(ImageTPMModel), "TPM model", "tpm-tis or tpm-crb")
	}
	if v, ok := r.ImageProps[ImageTPMVersion]; ok && Version(v) != V12 && Version(v) != V20 {
		return "", r.invalid(api.CodeInvalidTPMVersion, r.image(ImageTPMVersion), "TPM version", "1.2 or 2.0")
	}
	return hv, nil
}

// canonicalHypervisorType is Nova's HVType.canonicalize without the
// validity check: Python's str.lower, then xapi read as xen. Go's ToLower
// differs from Python's only on U+0130, which Python lowers to two runes;
// no other rune lowers differently to an ASCII letter.
func canonicalHypervisorType(v string) string {
	v = strings.ToLower(strings.ReplaceAll(v, "\u0130", "i\u0307"))
	if v == "xapi" {
		return "xen"
	}
	return v
}

// origin says where a value came from, for messages that name both sides.
type origin int

const (
	fromFlavor origin = iota
	fromImage
	fromDeployment
)

// prop is one looked-up property; an empty val means unset (typeImage has
// already refused an empty typed image property).
type prop struct {
	key, val string
	from     origin
}

func (r *Request) flavor(key string) prop { return prop{key, r.FlavorSpecs[key], fromFlavor} }
func (r *Request) image(key string) prop  { return prop{key, r.ImageProps[key], fromImage} }

// either is the flavor's value if set, else the image's, or a conflict.
func (r *Request) either(f, i prop) (prop, error) {
	if f.val != "" && i.val != "" && f.val != i.val {
		return prop{}, &Error{Code: api.CodeFlavorImageConflict, Message: fmt.Sprintf(
			"%s explicitly set to %s, conflicting with %s which has %s explicitly set to %s.",
			r.has(f), show(f.val), r.name(fromImage), i.key, show(i.val))}
	}
	if f.val != "" {
		return f, nil
	}
	return i, nil
}

// name is "flavor m1.small" or "image win11", or "the flavor" when unnamed.
func (r *Request) name(o origin) string {
	kind, n := "flavor", r.FlavorName
	if o == fromImage {
		kind, n = "image", r.ImageName
	}
	if n == "" {
		return "the " + kind
	}
	return kind + " " + show(n)
}

// has starts a sentence about a flavor or image property p:
// "Flavor m1.small has hw:tpm_version extra spec".
func (r *Request) has(p prop) string {
	if p.from == fromFlavor {
		return capitalize(r.name(fromFlavor)) + " has " + p.key + " extra spec"
	}
	return capitalize(r.name(fromImage)) + " has " + p.key + " property"
}

// setTo is a sentence start that also gives p's value.
func (r *Request) setTo(p prop) string {
	if p.from == fromDeployment {
		return "The deployment setting " + p.key + " is " + show(p.val)
	}
	return r.has(p) + " set to " + show(p.val)
}

// invalid is the refusal for a value outside its allowed set.
func (r *Request) invalid(code api.Code, p prop, what, allowed string) error {
	return &Error{Code: code, Message: fmt.Sprintf("%s, which is not a valid %s (expected %s).",
		r.setTo(p), what, allowed)}
}

func resolveLibvirt(r Request, opts Options) (*Spec, error) {
	for _, p := range []prop{r.image(ImageVTPMPolicy), r.flavor(FlavorVTPMPolicy), r.image(ImageVTPMKeys)} {
		if p.val != "" {
			return nil, &Error{Code: api.CodePropertyNotSupported, Message: fmt.Sprintf(
				"%s, which applies only to Hyper-V images (%s=%s); request a vTPM with %s or %s instead.",
				r.setTo(p), ImageHypervisorType, HyperV, FlavorTPMVersion, ImageTPMVersion)}
		}
	}

	v, err := r.either(r.flavor(FlavorTPMVersion), r.image(ImageTPMVersion))
	if err != nil {
		return nil, err
	}
	if v.val == "" {
		if opts.DefaultTPMVersion == "" {
			return nil, nil
		}
		v = prop{DefaultTPMVersionSetting, string(opts.DefaultTPMVersion), fromDeployment}
	}
	version := Version(v.val)
	if version != V12 && version != V20 {
		return nil, r.invalid(api.CodeInvalidTPMVersion, v, "TPM version", "1.2 or 2.0")
	}

	m, err := r.either(r.flavor(FlavorTPMModel), r.image(ImageTPMModel))
	if err != nil {
		return nil, err
	}
	model := TIS
	if m.val != "" {
		model = Model(m.val)
		if model != TIS && model != CRB {
			return nil, r.invalid(api.CodeInvalidTPMModel, m, "TPM model", "tpm-tis or tpm-crb")
		}
	}
	if model == CRB && version == V12 {
		return nil, &Error{Code: api.CodeCRBRequiresTPM2, Message: fmt.Sprintf(
			"%s, which needs TPM version 2.0, but %s.", r.setTo(m), lowerFirst(r.setTo(v)))}
	}

	ss := r.flavor(FlavorTPMSecretSecurity)
	mode := User
	if ss.val != "" {
		mode = SecretSecurity(ss.val)
		if mode != User && mode != HostMode && mode != Deployment {
			return nil, r.invalid(api.CodeInvalidSecretSecurity, ss, "secret security mode", "user, host or deployment")
		}
	}
	return &Spec{Version: version, Model: model, SecretSecurity: mode}, nil
}

// The Hyper-V vTPM policies of os_vtpm and os:vtpm.
const (
	policyDisabled = "disabled"
	policyOptional = "optional"
	policyRequired = "required"
)

func resolveHyperV(r Request) (*Spec, error) {
	if p, ok := firstWithPrefix(r.FlavorSpecs, "hw:tpm_"); ok {
		return nil, r.notOnHyperV(r.flavor(p))
	}
	if p, ok := firstWithPrefix(r.ImageProps, "hw_tpm_"); ok {
		return nil, r.notOnHyperV(r.image(p))
	}

	img, flv := r.image(ImageVTPMPolicy), r.flavor(FlavorVTPMPolicy)
	for _, p := range []prop{img, flv} {
		if p.val != "" && p.val != policyDisabled && p.val != policyOptional && p.val != policyRequired {
			return nil, r.invalid(api.CodeInvalidVTPMPolicy, p, "vTPM policy", "disabled, optional or required")
		}
	}

	var want bool
	switch img.val {
	case policyRequired:
		if flv.val == policyDisabled {
			return nil, r.policyConflict(img, flv)
		}
		want = true
	case policyOptional:
		want = flv.val == policyRequired
	default: // disabled or unset
		if flv.val == policyRequired {
			return nil, r.policyConflict(flv, img)
		}
	}

	keys, err := r.vtpmKeys()
	if err != nil {
		return nil, err
	}
	if !want {
		if keys != nil {
			return nil, &Error{Code: api.CodeVTPMKeysWithoutVTPM, Message: fmt.Sprintf(
				"%s set, but the request gets no vTPM; set %s=required on the image, or %s=optional on the image and %s=required on the flavor.",
				r.has(r.image(ImageVTPMKeys)), ImageVTPMPolicy, ImageVTPMPolicy, FlavorVTPMPolicy)}
		}
		return nil, nil
	}
	if mt := r.image(ImageMachineType); mt.val != HyperVGen2 {
		shown := "not set"
		if mt.val != "" {
			shown = "set to " + show(mt.val)
		}
		return nil, &Error{Code: api.CodeGen2Required, Message: fmt.Sprintf(
			"A Hyper-V vTPM needs a Generation 2 VM, but %s has %s %s; set %s=%s.",
			r.name(fromImage), ImageMachineType, shown, ImageMachineType, HyperVGen2)}
	}
	if keys == nil {
		keys = []string{}
	}
	return &Spec{Version: V20, Hypervisor: HyperV, Keys: keys}, nil
}

func (r *Request) notOnHyperV(p prop) error {
	return &Error{Code: api.CodePropertyNotSupported, Message: fmt.Sprintf(
		"%s, which Hyper-V images (%s=%s) do not support; request a vTPM with %s or %s instead.",
		r.setTo(p), ImageHypervisorType, HyperV, ImageVTPMPolicy, FlavorVTPMPolicy)}
}

// policyConflict explains why the policy in want cannot hold given other.
func (r *Request) policyConflict(want, other prop) error {
	state := "set to " + show(other.val)
	if other.val == "" {
		state = "not set, which means disabled"
	}
	return &Error{Code: api.CodeVTPMPolicyConflict, Message: fmt.Sprintf(
		"%s, conflicting with %s which has %s %s.",
		r.setTo(want), r.name(other.from), other.key, state)}
}

// vtpmKeys parses os_vtpm_keys: nil when unset, else lowercase UUIDs.
func (r *Request) vtpmKeys() ([]string, error) {
	p := r.image(ImageVTPMKeys)
	if p.val == "" {
		return nil, nil
	}
	n := strings.Count(p.val, ",") + 1
	if n > MaxVTPMKeys {
		return nil, &Error{Code: api.CodeTooManyVTPMKeys, Message: fmt.Sprintf(
			"%s with %d entries; at most %d are allowed.", r.has(p), n, MaxVTPMKeys)}
	}
	keys := make([]string, 0, n)
	for i, k := range strings.Split(p.val, ",") {
		k = strings.ToLower(strings.Trim(k, " "))
		bad := ""
		switch {
		case k == "":
			bad = "is empty"
		case !isCanonicalUUID(k):
			bad = "is not a UUID of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
		}
		for _, prev := range keys {
			if prev == k {
				bad = "repeats an earlier entry"
			}
		}
		if bad != "" {
			return nil, &Error{Code: api.CodeInvalidVTPMKey, Message: fmt.Sprintf(
				"%s, whose entry %d %s.", r.setTo(p), i+1, bad)}
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// isCanonicalUUID reports whether s (already lowercased) has the 8-4-4-4-12
// hex form of RFC 9562.
func isCanonicalUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// firstWithPrefix finds the smallest set key with the prefix, so that the
// error a request gets does not depend on map order.
func firstWithPrefix(m map[string]string, prefix string) (string, bool) {
	best, found := "", false
	for k, v := range m {
		if v != "" && strings.HasPrefix(k, prefix) && (!found || k < best) {
			best, found = k, true
		}
	}
	return best, found
}

// show renders a user-supplied value for a message: plain when it is short,
// printable and not empty, quoted and cut otherwise, so messages stay one
// safe line.
func show(v string) string {
	const max = 64
	plain := len(v) > 0 && len(v) <= max
	for i := 0; plain && i < len(v); i++ {
		plain = v[i] > ' ' && v[i] < 0x7f && v[i] != '"'
	}
	if plain {
		return v
	}
	if len(v) > max {
		return strconv.Quote(strings.ToValidUTF8(v[:max], "")) + "..."
	}
	return strconv.Quote(v)
}

func capitalize(s string) string { return strings.ToUpper(s[:1]) + s[1:] }
func lowerFirst(s string) string { return strings.ToLower(s[:1]) + s[1:] }
