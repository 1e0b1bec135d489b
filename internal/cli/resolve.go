package cli

import (
	"errors"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/cmdline"
	"github.com/vtpmd/vtpmd/internal/spec"
)

func newResolveCommand(g *globals) *cobra.Command {
	var (
		req            spec.Request
		flavor, image  []string
		defaultVersion string
	)
	cmd := &cobra.Command{
		Use:   "resolve",
		Short: "Show the vTPM a flavor and image ask for, and the host traits it needs",
		Long: `Resolve applies vtpmd's request semantics (Nova's hw:tpm_* and Hyper-V's os_vtpm
rules) to flavor extra specs and image properties, without a server. It prints
the resolved vTPM (null for none) and the traits a host must offer, or, with
exit status 1, the refusal's code and message.`,
		Example: `  vtpmctl resolve --flavor-spec hw:tpm_version=2.0 --image-prop hw_tpm_model=tpm-crb
  vtpmctl resolve --image-prop hypervisor_type=hyperv --image-prop hw_machine_type=hyperv-gen2 \
      --image-prop os_vtpm=required -o table`,
		Args: cmdline.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var err error
			if req.FlavorSpecs, err = parseProps("--flavor-spec", flavor); err != nil {
				return err
			}
			if req.ImageProps, err = parseProps("--image-prop", image); err != nil {
				return err
			}
			switch v := spec.Version(defaultVersion); v {
			case "", spec.V12, spec.V20:
			default:
				return cmdline.Usagef("--default-tpm-version %q: want 1.2, 2.0 or empty", defaultVersion)
			}

			format := g.format(outputJSON)
			s, err := spec.Resolve(req, spec.Options{DefaultTPMVersion: spec.Version(defaultVersion)})
			var se *spec.Error
			if errors.As(err, &se) {
				return refused(cmd.OutOrStdout(), format, se.APIError())
			} else if err != nil {
				return err
			}
			res := spec.Resolution(s)
			if format == outputJSON {
				return writeJSON(cmd.OutOrStdout(), res)
			}
			return writeFields(cmd.OutOrStdout(), resolutionFields(res))
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.FlavorName, "flavor-name", "", "flavor name, for messages")
	f.StringArrayVar(&flavor, "flavor-spec", nil, "flavor extra spec `K=V` (repeatable)")
	f.StringVar(&req.ImageName, "image-name", "", "image name, for messages")
	f.StringArrayVar(&image, "image-prop", nil, "image property `K=V` (repeatable)")
	f.StringVar(&defaultVersion, "default-tpm-version", "", "deployment default TPM version (1.2 or 2.0; empty: off)")
	return cmd
}

// parseProps turns repeated K=V flags into a map; a pair without "=", with
// an empty key, or a key given twice is a usage error.
func parseProps(flag string, pairs []string) (map[string]string, error) {
	m := make(map[string]string, len(pairs))
	for _, p := range pairs {
		k, v, ok := strings.Cut(p, "=")
		switch {
		case !ok:
			return nil, cmdline.Usagef("%s %q: want KEY=VALUE", flag, p)
		case k == "":
			return nil, cmdline.Usagef("%s %q: empty key", flag, p)
		}
		if _, dup := m[k]; dup {
			return nil, cmdline.Usagef("%s: %s given twice", flag, k)
		}
		m[k] = v
	}
	return m, nil
}

func resolutionFields(r api.Resolution) [][2]string {
	if r.VTPM == nil {
		return [][2]string{{"VTPM", "none"}, {"REQUIRED TRAITS", "-"}}
	}
	v := r.VTPM
	model, hv, ss := "-", "libvirt/qemu", v.SecretSecurity
	if v.Model != nil {
		model = *v.Model
	}
	if v.Hypervisor != "" {
		hv, ss = v.Hypervisor, "-"
	}
	return [][2]string{
		{"VERSION", v.Version},
		{"MODEL", model},
		{"SECRET SECURITY", ss},
		{"HYPERVISOR", hv},
		{"KEYS", orDash(v.Keys)},
		{"REQUIRED TRAITS", orDash(r.RequiredTraits)},
	}
}
