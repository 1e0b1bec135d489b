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
			return runEvacuation(cmd, g, "evacuating host "+args[0], func(progress func(api.EvacuationProgress)) (api.Evacuation, error) {
				return g.client().Evacuate(cmd.Context(), args[0], req, progress)
			}, printEvacuationCounts)
		},
	}
	cmd.Flags().BoolVar(&req.Force, "force", false, "evacuate though the host's agent still sends heartbeats (it is gone: you say so)")
	cmd.Flags().BoolVar(&req.NewTPM, "new-tpm", false, "give a vTPM without a backup a new TPM (new EK; its sealed data is lost)")
	return cmd
}

func hostEvacuateLiveCommand(g *globals) *cobra.Command {
	var req api.EvacuateLiveRequest
	cmd := &cobra.Command{
		Use:   "evacuate-live HOST",
		Short: "Drain a host and move its vTPMs to other hosts, running guests by live migration",
		Long: `evacuate-live empties a host before maintenance, as Nova's host-evacuate-live does: it drains
the host (no new vTPMs are placed there), then moves each of its vTPMs with its state to --to
HOST, or to the host placement chooses: a vTPM wanted running by live migration (live-migrate:
its guest runs throughout), a stopped one cold (migrate). One vTPM moves at a time, as Nova's
max_concurrent_live_migrations defaults to; --max-concurrent N moves up to 8. A vTPM that cannot
move is refused with its code (not_supported: a running vTPM on a backend that cannot migrate a
running guest, such as swtpm; no_valid_host, migration_in_progress, resize_pending, ...) and the
others go on. Each vTPM's outcome is printed as it is known (n of N); with -o json the progress
goes to stderr and the result, as JSON, to stdout. Running it again continues: the vTPMs moved
are no longer on the host, and a move cut short is resumed. The host stays drained (vtpmctl host
undrain after the maintenance).`,
		Args: exactlyOne,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runEvacuation(cmd, g, "evacuating host "+args[0]+" live", func(progress func(api.EvacuationProgress)) (api.Evacuation, error) {
				return g.client().EvacuateLive(cmd.Context(), args[0], req, progress)
			}, printLiveEvacuationCounts)
		},
	}
	cmd.Flags().StringVar(&req.Target, "to", "", "the host to move them to (default: the one placement chooses for each)")
	cmd.Flags().IntVar(&req.MaxConcurrent, "max-concurrent", 1, "how many vTPMs move at a time (1 to 8)")
	return cmd
}

// runEvacuation runs evacuate, printing what it says: heading and the
// number of vTPMs first, each vTPM's outcome as it is known (n of N), then
// the counts; with -o json the progress goes to stderr and the result, as
// JSON, to stdout.
func runEvacuation(cmd *cobra.Command, g *globals, heading string, evacuate func(func(api.EvacuationProgress)) (api.Evacuation, error),
	counts func(io.Writer, api.Evacuation) error) error {
	asJSON := g.format(outputTable) == outputJSON
	w := cmd.OutOrStdout()
	if asJSON {
		w = cmd.ErrOrStderr()
	}
	out, err := evacuate(func(p api.EvacuationProgress) {
		if p.Item == nil {
			fmt.Fprintf(w, "%s: %d vTPMs\n", heading, p.Total)
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
	return counts(cmd.OutOrStdout(), out)
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
	case api.EvacuatedLiveMigrated:
		fmt.Fprintf(w, "%s: live-migrated to %s, its guest running throughout\n", it.InstanceID, it.Host)
	case api.EvacuatedColdMigrated:
		fmt.Fprintf(w, "%s: migrated cold to %s, with its state\n", it.InstanceID, it.Host)
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

// printLiveEvacuationCounts writes the counts of a live evacuation by
// outcome.
func printLiveEvacuationCounts(w io.Writer, e api.Evacuation) error {
	_, err := fmt.Fprintf(w, "host %s: %d live-migrated, %d cold-migrated, %d refused\n", e.Host,
		e.Count[api.EvacuatedLiveMigrated], e.Count[api.EvacuatedColdMigrated], e.Count[api.EvacuatedRefused])
	return err
}
