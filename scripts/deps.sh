#!/usr/bin/env bash
# Installs the Debian packages vtpmd and its tests use, when missing.
set -euo pipefail

packages=(ca-certificates chromium fonts-dejavu-core git openssl postgresql swtpm swtpm-tools tpm2-tools)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "deps: installing ${missing[*]}"
	sudo_cmd=()
	[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
	"${sudo_cmd[@]}" apt-get update -qq
	DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v go >/dev/null || { echo "deps: Go 1.26 or newer is needed on PATH" >&2; exit 1; }
