package cli

import (
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
)

func newShelveCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "shelve INSTANCE",
		Short: "Put a stopped vTPM on the shelf: its state kept by the server, removed from its host",
		Long: `shelve exports a stopped vTPM's state (vtpmctl stop first) as a sealed bundle the server keeps
until unshelve or delete, then removes the vTPM from its host; its key-manager secret is kept,
and the vTPM stays listed, phase shelved, on no host. Interrupted, it is finished by running it
again.`,
		Args: exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := g.client().Shelve(cmd.Context(), args[0])
			if err != nil {
				return apiFailure(err)
			}
			return printVTPM(cmd.OutOrStdout(), g.format(outputTable), v)
		},
	}
}

func newUnshelveCommand(g *globals) *cobra.Command {
	var to string
	cmd := &cobra.Command{
		Use:   "unshelve INSTANCE",
		Short: "Place a shelved vTPM on a host again, with its state",
		Long: `unshelve places a shelved vTPM on the host the placement rules choose (or --to HOST, the
operator's) and has its agent import the shelved state; the agent proves it is the same TPM
(its endorsement keys) before it takes it, and only then does the server drop its copy. The
vTPM is stopped there: start it (vtpmctl start). Interrupted, it is finished by running it
again.`,
		Args: exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := g.client().Unshelve(cmd.Context(), args[0], to)
			if err != nil {
				return apiFailure(err)
			}
			return printVTPM(cmd.OutOrStdout(), g.format(outputTable), v)
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the host to place it on (default: the placement rules choose)")
	return cmd
}

func hostEvacuateCommand(g *globals) *cobra.Command {
	var req api.EvacuateRequest
	cmd := &cobra.Command{
		Use:   "evacuate HOST",
		Short: "Restore the vTPMs of a host that is gone on other hosts, from their newest backups",
		Long: `evacuate moves every vTPM of a host that is gone (down: no heartbeat within the window; or
--force, the operator says so) to other hosts: each is restored from its newest backup, with
its EK, and loses what changed after that backup (its events say since when). A vTPM without a
backup is refused unless --new-tpm, which gives it a new TPM (a new EK, no sealed data). A vTPM
migrating from the host whose state had left it is moved on to its target; one migrating to the
host stays on (or goes back to) its source. Each vTPM's outcome is printed as it is known (n of
N); with -o json the progress goes to stderr and the result, as JSON, to stdout. Running it again
continues what an interrupted run left.`,
		Args: exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON := g.format(outputTable) == outputJSON
			w := cmd.OutOrStdout()
			if asJSON {
				w = cmd.ErrOrStderr()
			}
			out, err := g.client().Evacuate(cmd.Context(), args[0], req, func(p api.EvacuationProgress) {
				if p.Item == nil {
					fmt.Fprintf(w, "evacuating host %s: %d vTPMs\n", args[0], p.Total)
					return
				}
				fmt.Fprintf(w, "[%d/%d] ", p.Done, p.Total)
				printEvacuated(w, *p.Item)
			})
			if err != nil {
				return apiFailure(err)
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), out)
			}
			return printEvacuationCounts(cmd.OutOrStdout(), out)
		},
	}
	cmd.Flags().BoolVar(&req.Force, "force", false, "evacuate though the host's agent still sends heartbeats (it is gone: you say so)")
	cmd.Flags().BoolVar(&req.NewTPM, "new-tpm", false, "give a vTPM without a backup a new TPM (new EK; its sealed data is lost)")
	return cmd
}

// printEvacuated writes what became of one vTPM of an evacuated host, a
// line.
func printEvacuated(w io.Writer, it api.EvacuatedVTPM) {
	switch it.Outcome {
	case api.EvacuatedRestored:
		fmt.Fprintf(w, "%s: restored on %s from generation %d; changes after %s are lost\n",
			it.InstanceID, it.Host, it.Generation, it.BackupAt.Format(time.RFC3339))
	case api.EvacuatedNewTPM:
		fmt.Fprintf(w, "%s: no backup; a new TPM on %s (new EK, sealed data lost)\n", it.InstanceID, it.Host)
	case api.EvacuatedPlaced:
		fmt.Fprintf(w, "%s: never manufactured; placed on %s\n", it.InstanceID, it.Host)
	case api.EvacuatedMigrated:
		fmt.Fprintf(w, "%s: its migration finished; on %s with the state it left with (generation %d)\n", it.InstanceID, it.Host, it.Generation)
	case api.EvacuatedReturned:
		fmt.Fprintf(w, "%s: its migration to this host undone; on %s with the state it had there\n", it.InstanceID, it.Host)
	case api.EvacuatedRefused:
		fmt.Fprintf(w, "%s: refused (%s): %s\n", it.InstanceID, it.Code, it.Message)
	default:
		fmt.Fprintf(w, "%s: %s\n", it.InstanceID, it.Outcome)
	}
}

// printEvacuationCounts writes the counts of an evacuation by outcome.
func printEvacuationCounts(w io.Writer, e api.Evacuation) error {
	_, err := fmt.Fprintf(w, "host %s: %d restored, %d new TPM, %d placed, %d deleted, %d shelved, %d migrated, %d returned, %d refused\n", e.Host,
		e.Count[api.EvacuatedRestored], e.Count[api.EvacuatedNewTPM], e.Count[api.EvacuatedPlaced],
		e.Count[api.EvacuatedDeleted], e.Count[api.EvacuatedShelved], e.Count[api.EvacuatedMigrated],
		e.Count[api.EvacuatedReturned], e.Count[api.EvacuatedRefused])
	return err
}
