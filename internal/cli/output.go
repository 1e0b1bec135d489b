package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/cmdline"
)

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// writeFields prints name/value pairs as an aligned two-column table.
func writeFields(w io.Writer, fields [][2]string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, f := range fields {
		fmt.Fprintf(tw, "%s\t%s\n", f[0], f[1])
	}
	return tw.Flush()
}

// refused reports a refusal from vtpmd's request semantics: the error body
// on stdout in JSON mode, a line on stderr otherwise; either way exit 1.
func refused(w io.Writer, format string, e api.Error) error {
	if format == outputJSON {
		if err := writeJSON(w, api.ErrorBody{Error: e}); err != nil {
			return err
		}
		return cmdline.Exit(ExitFailed, nil)
	}
	return cmdline.Exit(ExitFailed, fmt.Errorf("%s: %s", e.Code, e.Message))
}

// orDash renders an empty list as "-".
func orDash(items []string) string {
	items = slices.DeleteFunc(slices.Clone(items), func(s string) bool { return s == "" })
	if len(items) == 0 {
		return "-"
	}
	return strings.Join(items, ",")
}
