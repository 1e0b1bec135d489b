package command

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/backend/libvirt"
	"github.com/vtpmd/vtpmd/internal/cmdline"
)

func newConfigureHostCommand() *cobra.Command {
	var user, group, path string
	cmd := &cobra.Command{
		Use:   "configure-host --swtpm-user U --swtpm-group G [--qemu-conf FILE]",
		Short: "Set swtpm_user and swtpm_group in libvirt's qemu.conf",
		Long: "Set swtpm_user and swtpm_group in libvirt's qemu.conf, keeping every other line, and say\n" +
			"what changed. libvirtd reads it when it starts.",
		Args: cmdline.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if user == "" || group == "" {
				return cmdline.Usagef("--swtpm-user and --swtpm-group are required")
			}
			return configureHost(cmd, path, user, group)
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&user, "swtpm-user", "", "user libvirt runs swtpm as (required)")
	fs.StringVar(&group, "swtpm-group", "", "group libvirt runs swtpm as (required)")
	fs.StringVar(&path, "qemu-conf", libvirt.QEMUConfPath, "libvirt's qemu.conf")
	return cmd
}

// configureHost writes swtpm_user and swtpm_group into the qemu.conf at
// path, keeping every other line, and says what it changed.
func configureHost(cmd *cobra.Command, path, user, group string) error {
	out := cmd.OutOrStdout()
	info, err := os.Stat(path)
	if err != nil {
		return err
	}
	conf, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	changed, changes, err := libvirt.ConfigureQEMUConf(conf, user, group)
	if err != nil {
		return cmdline.Usage(err)
	}
	if len(changes) == 0 {
		fmt.Fprintf(out, "%s already runs swtpm as %s:%s; nothing changed\n", path, user, group)
		return nil
	}
	if err := atomicfile.Write(path, changed, info.Mode().Perm()); err != nil {
		return err
	}
	for _, c := range changes {
		fmt.Fprintf(out, "%s: %s\n", path, c)
	}
	fmt.Fprintln(out, "restart libvirtd for the change to take effect")
	return nil
}
