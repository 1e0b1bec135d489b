package command

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/internal/cmdline"
	"github.com/vtpmd/vtpmd/internal/daemon"
)

func newKeysCommand() *cobra.Command {
	keys := &cobra.Command{
		Use:   "keys",
		Short: "Manage the deployment's master key",
		Args:  cmdline.NoArgs,
		RunE:  cmdline.NeedSubcommand,
	}
	keys.AddCommand(newRotateMasterCommand())
	return keys
}

func newRotateMasterCommand() *cobra.Command {
	var newKeyFile string
	cmd := &cobra.Command{
		Use:   "rotate-master --new-key-file FILE [--config FILE] [flags]",
		Short: "Re-seal every key in the store under a new master key",
		Long: "Re-seal every key in the store (the key manager's secrets, the CAs', the verdict signing key) under\n" +
			"the master key in --new-key-file, made with a fresh key if the file does not exist, in one\n" +
			"transaction. Then install that file as master-key-file on every server replica: until a replica's\n" +
			"file holds the new key its requests that need a key fail and /readyz reads not ready; after, it\n" +
			"carries on without a restart. Run it on a server host with that host's configuration. " + configHelp,
		Args: cmdline.NoArgs,
	}
	f := bindConfig(cmd, daemon.RoleServer)
	cmd.Flags().StringVar(&newKeyFile, "new-key-file", "", "file (mode 0600) of the new master key; made if missing")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if newKeyFile == "" {
			return cmdline.Usagef("rotate-master needs --new-key-file FILE")
		}
		cfg, err := f.load()
		if err != nil {
			return err
		}
		r, err := daemon.RotateMasterKey(cmd.Context(), cfg, newKeyFile)
		if err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "re-sealed %d keys: master key %s → %s\n"+
			"now install %s as master-key-file (%s here) on every server replica, mode 0600\n",
			r.Resealed, r.From, r.To, newKeyFile, cfg.MasterKeyFile)
		return nil
	}
	return cmd
}
