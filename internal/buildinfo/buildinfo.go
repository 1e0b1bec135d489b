// Package buildinfo says which build of vtpmd is running, as agents report
// it with their heartbeats.
package buildinfo

import "runtime/debug"

// Version is this build's version: the main module's as the go command
// stamped it (a release tag such as v1.2.0, or a pseudo-version naming the
// commit, +dirty for uncommitted changes), or "dev" for a build that has
// none (a test binary, a build outside version control).
func Version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok || bi.Main.Version == "" || bi.Main.Version == "(devel)" {
		return "dev"
	}
	return bi.Main.Version
}
