package spec

import (
	"errors"
	"testing"

	"github.com/vtpmd/vtpmd/api"
)

// TestResize is Nova's resize matrix: every (old flavor, new flavor) pair of
// vTPM version, model and secret security its tests cover, with Nova's
// outcome. Sources, in openstack/nova:
//
//   - F: nova/tests/functional/libvirt/test_vtpm.py
//     (test_resize_vtpm_server_secret_security_deployment_{unsupported,
//     supported}, test_resize_server__{no_vtpm_to_vtpm,vtpm_to_no_vtpm},
//     test_resize_revert_server__vtpm_to_vtpm_{same,different}_config);
//   - U: nova/tests/unit/virt/libvirt/test_driver.py
//     (test_finish_migration_vtpm{,_version_change,_no_tpm},
//     test_finish_revert_migration_vtpm__*);
//   - D: nova/virt/libvirt/driver.py _finish_migration_vtpm, which compares
//     (version, model) as one pair, so a model change alone is a new TPM.
//
// The flavors are resolved first, as Nova resolves get_vtpm_constraint
// and get_instance_tpm_secret_security; "" secret security is unset.
func TestResize(t *testing.T) {
	flavor := func(version, model, security string) kv {
		if version == "" {
			return kv{} // no vTPM
		}
		f := kv{FlavorTPMVersion: version, FlavorTPMModel: model}
		if security != "" {
			f[FlavorTPMSecretSecurity] = security
		}
		return f
	}
	tis12 := func(security string) kv { return flavor("1.2", "tpm-tis", security) }
	none := kv{}

	tests := []struct {
		source   string
		old, new kv
		want     ResizeKind
		code     api.Code
	}{
		// F: secret security changes to or from deployment are refused (400).
		{"F unset→deployment", tis12(""), tis12("deployment"), "", api.CodeSecretSecurityChangeNotSupported},
		{"F deployment→unset", tis12("deployment"), tis12(""), "", api.CodeSecretSecurityChangeNotSupported},
		{"F user→deployment", tis12("user"), tis12("deployment"), "", api.CodeSecretSecurityChangeNotSupported},
		{"F deployment→user", tis12("deployment"), tis12("user"), "", api.CodeSecretSecurityChangeNotSupported},
		{"F host→deployment", tis12("host"), tis12("deployment"), "", api.CodeSecretSecurityChangeNotSupported},
		{"F deployment→host", tis12("deployment"), tis12("host"), "", api.CodeSecretSecurityChangeNotSupported},
		// F: those that change no secret's owner are allowed, the state kept.
		{"F unset→unset", tis12(""), tis12(""), ResizeKeep, ""},
		{"F user→user", tis12("user"), tis12("user"), ResizeKeep, ""},
		{"F host→host", tis12("host"), tis12("host"), ResizeKeep, ""},
		{"F deployment→deployment", tis12("deployment"), tis12("deployment"), ResizeKeep, ""},
		{"F unset→user", tis12(""), tis12("user"), ResizeKeep, ""},
		{"F user→unset", tis12("user"), tis12(""), ResizeKeep, ""},
		{"F unset→host", tis12(""), tis12("host"), ResizeKeep, ""},
		{"F host→unset", tis12("host"), tis12(""), ResizeKeep, ""},
		{"F user→host", tis12("user"), tis12("host"), ResizeKeep, ""},
		{"F host→user", tis12("host"), tis12("user"), ResizeKeep, ""},
		// F: no vTPM → vTPM, in every secret security mode.
		{"F none→unset", none, tis12(""), ResizeAdd, ""},
		{"F none→user", none, tis12("user"), ResizeAdd, ""},
		{"F none→host", none, tis12("host"), ResizeAdd, ""},
		{"F none→deployment", none, tis12("deployment"), ResizeAdd, ""},
		// F: vTPM → no vTPM, in every secret security mode.
		{"F unset→none", tis12(""), none, ResizeRemove, ""},
		{"F user→none", tis12("user"), none, ResizeRemove, ""},
		{"F host→none", tis12("host"), none, ResizeRemove, ""},
		{"F deployment→none", tis12("deployment"), none, ResizeRemove, ""},
		// F: revert tests' resizes between vTPMs.
		{"F 1.2 tis→1.2 tis (same config)", tis12(""), tis12(""), ResizeKeep, ""},
		{"F 1.2 tis→2.0 tis (different config)", tis12(""), flavor("2.0", "tpm-tis", ""), ResizeNewTPM, ""},
		// U: finish_migration.
		{"U 2.0 tis→2.0 tis", flavor("2.0", "tpm-tis", ""), flavor("2.0", "tpm-tis", ""), ResizeKeep, ""},
		{"U 2.0 tis→1.2 tis (version change)", flavor("2.0", "tpm-tis", ""), tis12(""), ResizeNewTPM, ""},
		{"U 2.0 tis→none", flavor("2.0", "tpm-tis", ""), none, ResizeRemove, ""},
		{"U none→2.0 tis (revert deletes)", none, flavor("2.0", "tpm-tis", ""), ResizeAdd, ""},
		// D: the model is half of the pair Nova compares.
		{"D 2.0 tis→2.0 crb", flavor("2.0", "tpm-tis", ""), flavor("2.0", "tpm-crb", ""), ResizeNewTPM, ""},
		{"D 2.0 crb→2.0 tis", flavor("2.0", "tpm-crb", ""), flavor("2.0", "tpm-tis", ""), ResizeNewTPM, ""},
		{"D 1.2 tis→2.0 crb", tis12(""), flavor("2.0", "tpm-crb", ""), ResizeNewTPM, ""},
		// D: the model defaults to tpm-tis, so an unset one is tis.
		{"D 2.0 unset→2.0 tis", kv{FlavorTPMVersion: "2.0"}, flavor("2.0", "tpm-tis", ""), ResizeKeep, ""},
		// A version and model change is still allowed with a secret
		// security change that keeps the secret's owner.
		{"D 1.2 tis user→2.0 crb host", tis12("user"), flavor("2.0", "tpm-crb", "host"), ResizeNewTPM, ""},
		{"D 1.2 tis host→2.0 crb deployment", tis12("host"), flavor("2.0", "tpm-crb", "deployment"), "", api.CodeSecretSecurityChangeNotSupported},
		// Neither has a vTPM: nothing to resize.
		{"none→none", none, none, "", api.CodeNoVTPMRequested},
	}
	for _, tt := range tests {
		t.Run(tt.source, func(t *testing.T) {
			old, err := Resolve(Request{FlavorSpecs: tt.old}, Options{})
			if err != nil {
				t.Fatalf("old flavor: %v", err)
			}
			new, err := Resolve(Request{FlavorSpecs: tt.new}, Options{})
			if err != nil {
				t.Fatalf("new flavor: %v", err)
			}
			got, err := Resize(old, new)
			var se *Error
			switch {
			case tt.code != "" && (!errors.As(err, &se) || se.Code != tt.code):
				t.Fatalf("Resize = %q, %v; want refusal %s", got, err, tt.code)
			case tt.code == "" && err != nil:
				t.Fatalf("Resize: %v; want %s", err, tt.want)
			case got != tt.want:
				t.Fatalf("Resize = %q; want %q", got, tt.want)
			}
		})
	}
}

// TestResizeHyperV: vtpmd resizes no Hyper-V vTPM, either way.
func TestResizeHyperV(t *testing.T) {
	hv := &Spec{Version: V20, Hypervisor: HyperV, Keys: []string{}}
	qemu := &Spec{Version: V20, Model: TIS, SecretSecurity: User}
	for _, pair := range [][2]*Spec{{hv, hv}, {hv, nil}, {nil, hv}, {qemu, hv}, {hv, qemu}} {
		_, err := Resize(pair[0], pair[1])
		var se *Error
		if !errors.As(err, &se) || se.Code != api.CodeResizeNotSupported {
			t.Errorf("Resize(%v, %v) = %v; want %s", pair[0], pair[1], err, api.CodeResizeNotSupported)
		}
	}
}
