package cli

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/cmdline"
)

func newBenchCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "bench", Short: "Measure vtpmd against the incumbent tools", Args: cmdline.NoArgs}
	cmd.AddCommand(newBenchProvisionCommand(g))
	return cmd
}

// provisionResult is one side of the provisioning benchmark.
type provisionResult struct {
	Name      string        `json:"name"`
	N         int           `json:"n"`
	P50       time.Duration `json:"p50_ns"`
	P95       time.Duration `json:"p95_ns"`
	PerSecond float64       `json:"per_second"`
}

func newBenchProvisionCommand(g *globals) *cobra.Command {
	var (
		n        int
		version  string
		baseline bool
	)
	cmd := &cobra.Command{
		Use:   "provision",
		Short: "Create-to-ready latency of vTPMs, side by side with libvirt's first-start path (swtpm_setup)",
		Long: `Creates N vTPMs one after another through the API, timing each from the create
request until the vTPM is active, then deletes them. In the same run it times
N runs of what libvirt does on a guest's first start, swtpm_setup --tpm2
--create-ek-cert --create-platform-cert into an empty directory, and prints
both with the ratio.`,
		Args: cmdline.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if n < 1 {
				return cmdline.Usagef("-n must be at least 1")
			}
			ctx := cmd.Context()
			progress := cmd.ErrOrStderr()
			c := g.client()
			var ours []time.Duration
			var ids []string
			start := time.Now()
			for i := range n {
				id := uuid.NewString()
				t0 := time.Now()
				if _, err := c.Create(ctx, api.CreateVTPMRequest{InstanceID: id, Project: "bench",
					ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": version}}}); err != nil {
					return apiFailure(err)
				}
				ids = append(ids, id)
				v, err := c.Wait(ctx, id, func(v api.VTPM) bool { return v.Phase == "active" || v.Phase == "error" }, nil)
				if err != nil {
					return apiFailure(err)
				}
				if v.Phase == "error" {
					return cmdline.Exit(ExitFailed, fmt.Errorf("vTPM %s failed: %s", id, v.Reason))
				}
				ours = append(ours, time.Since(t0))
				fmt.Fprintf(progress, "vtpmd       %3d/%d  %v\n", i+1, n, ours[i].Round(time.Millisecond))
			}
			results := []provisionResult{summarize("vtpmd create→active", ours, time.Since(start))}
			cleanup(ctx, c, ids)

			if baseline {
				theirs, total, err := benchSwtpmSetup(ctx, n, version, func(i int, d time.Duration) {
					fmt.Fprintf(progress, "swtpm_setup %3d/%d  %v\n", i+1, n, d.Round(time.Millisecond))
				})
				if err != nil {
					return cmdline.Exit(ExitFailed, err)
				}
				results = append(results, summarize("swtpm_setup (libvirt first start)", theirs, total))
			}
			w := cmd.OutOrStdout()
			if g.format(outputTable) == outputJSON {
				return writeJSON(w, results)
			}
			rows := [][2]string{{"TOOL", "N  P50  P95  PER SECOND"}}
			for _, r := range results {
				rows = append(rows, [2]string{r.Name, fmt.Sprintf("%d  %v  %v  %.1f", r.N, r.P50.Round(time.Microsecond), r.P95.Round(time.Microsecond), r.PerSecond)})
			}
			if len(results) == 2 {
				rows = append(rows, [2]string{"ratio (swtpm_setup / vtpmd, p50)", fmt.Sprintf("%.1f×", float64(results[1].P50)/float64(results[0].P50))})
			}
			return writeFields(w, rows)
		},
	}
	cmd.Flags().IntVarP(&n, "n", "n", 20, "how many vTPMs to create")
	cmd.Flags().StringVar(&version, "tpm-version", "2.0", "TPM version to create (1.2 or 2.0)")
	cmd.Flags().BoolVar(&baseline, "baseline", true, "also time swtpm_setup in the same run")
	return cmd
}

func summarize(name string, d []time.Duration, total time.Duration) provisionResult {
	s := slices.Clone(d)
	slices.Sort(s)
	q := func(p float64) time.Duration { return s[min(len(s)-1, int(p*float64(len(s))))] }
	return provisionResult{Name: name, N: len(s), P50: q(0.5), P95: q(0.95), PerSecond: float64(len(s)) / total.Seconds()}
}

// cleanup deletes the benchmark's vTPMs and waits until they are gone.
func cleanup(ctx context.Context, c *client.Client, ids []string) {
	for _, id := range ids {
		c.Delete(ctx, id)
	}
	for _, id := range ids {
		c.Wait(ctx, id, func(api.VTPM) bool { return false }, nil)
	}
}

// benchSwtpmSetup times swtpm_setup manufacturing into fresh directories.
func benchSwtpmSetup(ctx context.Context, n int, version string, progress func(int, time.Duration)) ([]time.Duration, time.Duration, error) {
	var out []time.Duration
	start := time.Now()
	for i := range n {
		dir, err := os.MkdirTemp("", "bench-swtpm-setup-")
		if err != nil {
			return nil, 0, err
		}
		args := []string{"--tpmstate", dir, "--create-ek-cert", "--create-platform-cert", "--overwrite"}
		if version == "2.0" {
			args = append([]string{"--tpm2"}, args...)
		}
		t0 := time.Now()
		b, err := exec.CommandContext(ctx, "swtpm_setup", args...).CombinedOutput()
		d := time.Since(t0)
		os.RemoveAll(dir)
		if err != nil {
			return nil, 0, fmt.Errorf("swtpm_setup: %v: %s", err, b)
		}
		out = append(out, d)
		progress(i, d)
	}
	return out, time.Since(start), nil
}
