#!/usr/bin/env bash
# Density: N running vTPMs on one host. Prints how long creating them took,
# how long a restarted vtpmd took to bring them all back, and vtpmd's own
# memory per supervised vTPM (swtpm's own memory is not vtpmd's).
set -euo pipefail
N=${N:-1000}
PORT=${PORT:-8790}
BIN=${BIN:-bin}
DIR=$(mktemp -d /tmp/vtpmd-density.XXXXXX)
export VTPMD_SERVER=unix://$DIR/api.sock
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT

rss_kib() { awk '/^VmRSS/ {print $2}' /proc/$1/status; }
start_vtpmd() {
	"$BIN/vtpmd" all-in-one --data-dir "$DIR" --listen 127.0.0.1:$PORT --capacity $((N + 10)) --pool-size 0 --log-level error 2>>"$DIR/vtpmd.log" &
	PID=$!
	until "$BIN/vtpmctl" hosts >/dev/null 2>&1; do sleep 0.05; done
}
active() { "$BIN/vtpmctl" list --phase active -o json | grep -c '"instance_id"' || true; }
wait_active() {
	local t0=$1
	while :; do
		local n; n=$(active)
		printf '\r  %d/%d active  %ds' "$n" "$N" $(( $(date +%s) - t0 )) >&2
		[ "$n" -ge "$N" ] && break
		sleep 1
	done
	echo >&2
}

start_vtpmd
base=$(rss_kib $PID)
echo "creating $N vTPMs" >&2
t0=$(date +%s.%N)
batch=()
for i in $(seq 1 "$N"); do
	"$BIN/vtpmctl" create --instance "$(cat /proc/sys/kernel/random/uuid)" --for-project density \
		--flavor-spec hw:tpm_version=2.0 --wait=false -o json >/dev/null &
	batch+=($!)
	if (( ${#batch[@]} == 50 || i == N )); then wait "${batch[@]}"; batch=(); fi
done
wait_active "${t0%.*}"
create_s=$(awk "BEGIN{print $(date +%s.%N) - $t0}")
full=$(rss_kib $PID)

echo "restarting vtpmd" >&2
kill $PID; wait $PID || true
t0=$(date +%s.%N)
start_vtpmd
wait_active "${t0%.*}"
restart_s=$(awk "BEGIN{print $(date +%s.%N) - $t0}")
after=$(rss_kib $PID)
threads=$(awk '/^Threads/ {print $2}' /proc/$PID/status)

swtpms=$(pgrep -c -f "swtpm socket.*$DIR" || true)
echo "vtpms_running=$swtpms"
echo "create_all_seconds=$create_s"
echo "restart_all_active_seconds=$restart_s"
echo "vtpmd_rss_kib_empty=$base"
echo "vtpmd_rss_kib_with_n=$full"
echo "vtpmd_rss_kib_after_restart_with_n=$after"
echo "vtpmd_threads_with_n=$threads"
echo "vtpmd_kib_per_vtpm_after_create=$(( (full - base) / N ))"
echo "vtpmd_kib_per_vtpm_after_restart=$(( (after - base) / N ))"
