#!/usr/bin/env bash
# A throwaway vtpmd cluster on this machine, narrated: a PostgreSQL, one
# `vtpmd server` (HTTPS on 127.0.0.1 with a self-signed certificate) and two
# `vtpmd agent`s (swtpm backend, hosts demo-a and demo-b), each enrolled with
# a one-time join token. It shows where vTPMs land, a host going down with
# its vTPMs still running (the same swtpm processes, their PCRs intact),
# and the host coming back. Everything it starts and writes goes when it
# exits, Ctrl-C included (KEEP=1 keeps the files, to read the logs). It
# takes about 15 seconds.
#
#   make demo-cluster          (builds bin/ first)
#   BIN=bin DEMO_PORT=8788 scripts/demo-cluster.sh
set -euo pipefail

BIN=$(cd "${BIN:-bin}" && pwd)
for b in vtpmd vtpmctl; do
	[ -x "$BIN/$b" ] || { echo "demo-cluster: $BIN/$b is missing: run make build" >&2; exit 1; }
done
for c in openssl swtpm tpm2_pcrextend; do
	command -v "$c" >/dev/null || { echo "demo-cluster: $c is missing: run make deps" >&2; exit 1; }
done
# listening PORT: whether something on this machine listens on 127.0.0.1:PORT.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT=${DEMO_PORT:-8788}
if [ -z "${DEMO_PORT:-}" ]; then
	while listening "$PORT"; do PORT=$((PORT + 1)); done
elif listening "$PORT"; then
	echo "demo-cluster: 127.0.0.1:$PORT is taken: choose another DEMO_PORT" >&2
	exit 1
fi
PGBIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
[ -x "$PGBIN/initdb" ] || { echo "demo-cluster: PostgreSQL is missing (Debian package postgresql): run make deps" >&2; exit 1; }

umask 077 # keys, passfile, tokens: this user's only
WORK=$(mktemp -d /tmp/vtpmd-demo.XXXXXX)
declare -A PID=() # server, agent-a, agent-b → pid

# --- narration and helpers ---------------------------------------------------

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
# show runs a command, printing it first as the operator would type it.
show() {
	printf '\033[2m$ %s\033[0m\n' "$*"
	"$@"
}
die() {
	printf '\ndemo-cluster: %s\n' "$*" >&2
	exit 1
}

vtpmctl() { "$BIN/vtpmctl" --server "unix://$WORK/server/api.sock" "$@"; }

# until_true SECONDS WHAT CMD...: run CMD every fifth of a second until it
# succeeds; gives up after SECONDS, or at once if a process of the demo's
# has exited.
until_true() {
	local limit=$(($1 * 5)) what=$2 name
	shift 2
	for ((i = 0; i < limit; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		for name in "${!PID[@]}"; do
			kill -0 "${PID[$name]}" 2>/dev/null || die "vtpmd $name exited while waiting for $what"
		done
		sleep 0.2
	done
	die "gave up after $1s waiting for $what"
}

# host_state NAME: the host's STATE column in vtpmctl hosts.
host_state() { vtpmctl hosts | awk -v h="$1" '$1 == h { print $3 }'; }
host_is() { [ "$(host_state "$1")" = "$2" ]; }

# show_hosts: vtpmctl hosts without its last column, TRAITS (long, and the
# same on every host here).
show_hosts() {
	printf '\033[2m$ vtpmctl hosts\033[0m   (TRAITS left out)\n'
	vtpmctl hosts | sed 's/ *[^ ]*$//'
}

# active_on HOST: how many of HOST's vTPMs are active.
active_on() { vtpmctl list --host "$1" --phase active | tail -n +2 | wc -l; }

# data_socket ID: where the vTPM of instance ID serves its TPM.
data_socket() { vtpmctl show "$1" | awk '$1 == "DATA" { print $3 }'; }

# pcr16: PCR 16 (SHA-256) of the TPM at TPM2TOOLS_TCTI.
pcr16() { tpm2_pcrread sha256:16 | awk '$1 == "16:" { print $2 }'; }

# swtpms DIR: pids of the swtpm processes serving state under DIR, on one
# line.
swtpms() {
	local p
	for p in $(pgrep -x swtpm || true); do
		if grep -qF -- "$1/" "/proc/$p/cmdline" 2>/dev/null; then echo "$p"; fi
	done | sort -n | paste -sd ' '
}

# as_postgres CMD...: PostgreSQL refuses to run as root; run it as postgres.
as_postgres() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

new_instance() { cat /proc/sys/kernel/random/uuid; }

# create [ID]: a TPM 2.0 vTPM for a new instance (or ID), waiting until it is
# active; says which host it landed on.
create() {
	local id=${1:-$(new_instance)} host
	printf '\033[2m$ vtpmctl create --for-project demo --instance %s --flavor-spec hw:tpm_version=2.0\033[0m\n' "$id"
	host=$(vtpmctl create --for-project demo --instance "$id" --flavor-spec hw:tpm_version=2.0 | awk '$1 == "HOST" { print $2 }')
	say "→ placed on $host"
}

# --- cleanup ------------------------------------------------------------------

cleanup() {
	local status=$?
	set +e
	trap - EXIT INT TERM
	for name in agent-a agent-b server; do
		[ -n "${PID[$name]:-}" ] && kill -TERM "${PID[$name]}" 2>/dev/null
	done
	for name in agent-a agent-b server; do
		[ -n "${PID[$name]:-}" ] && wait "${PID[$name]}" 2>/dev/null
	done
	# swtpm processes an agent leaves running for its guests outlive it.
	local left
	read -ra left <<<"$(swtpms "$WORK")"
	[ ${#left[@]} -gt 0 ] && kill -KILL "${left[@]}" 2>/dev/null
	[ -f "$WORK/pg/data/postmaster.pid" ] && as_postgres "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m fast -w stop >/dev/null
	if [ "$status" -ne 0 ]; then
		for log in "$WORK"/*.log; do
			[ -f "$log" ] && { echo "--- last lines of $(basename "$log")"; tail -n 15 "$log"; }
		done
	fi
	local stray
	stray=$(pgrep -f -- "$WORK" || true)
	[ -n "$stray" ] && echo "demo-cluster: still running after cleanup: $(paste -sd ' ' <<<"$stray")" >&2
	if [ -n "${KEEP:-}" ]; then
		echo "demo-cluster: files kept in $WORK"
	else
		rm -rf "$WORK"
	fi
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- PostgreSQL -----------------------------------------------------------------

step "A throwaway PostgreSQL, on a unix socket only, passwords in a passfile"
chmod 0711 "$WORK"
mkdir -p "$WORK/pg" "$WORK/tls"
# Passwords go through files and stdin, never argv.
openssl rand -hex 24 >"$WORK/pg/superuser.pw"
vtpmd_pw=$(openssl rand -hex 24)
pgport=$((20000 + $$ % 10000)) # names the socket only
# libpq's passfile: host:port:database:user:password.
printf '*:*:*:postgres:%s\n*:*:*:vtpmd:%s\n' "$(cat "$WORK/pg/superuser.pw")" "$vtpmd_pw" >"$WORK/pgpass"
[ "$(id -u)" -eq 0 ] && chown -R postgres: "$WORK/pg"
as_postgres "$PGBIN/initdb" -D "$WORK/pg/data" -U postgres -A scram-sha-256 --pwfile "$WORK/pg/superuser.pw" -E UTF8 --no-sync >"$WORK/postgres.log" 2>&1
as_postgres "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
	-o "-c listen_addresses='' -k $WORK/pg -p $pgport -c fsync=off" start >>"$WORK/postgres.log" 2>&1
rm "$WORK/pg/superuser.pw"
PGPASSFILE="$WORK/pgpass" "$PGBIN/psql" -q -v ON_ERROR_STOP=1 -h "$WORK/pg" -p "$pgport" -U postgres -d postgres <<SQL
CREATE ROLE vtpmd LOGIN PASSWORD '$vtpmd_pw';
CREATE DATABASE vtpmd OWNER vtpmd;
SQL
unset vtpmd_pw
say "database vtpmd, role vtpmd; its password is only in the passfile (PGPASSFILE)"

# --- server ---------------------------------------------------------------------

step "vtpmd server: HTTPS on 127.0.0.1:$PORT, store in PostgreSQL, heartbeat window 6s"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/CN=vtpmd demo" \
	-addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
	-keyout "$WORK/tls/api.key" -out "$WORK/tls/api.pem" 2>/dev/null
cat >"$WORK/server.yaml" <<EOF
data-dir: $WORK/server
listen: 127.0.0.1:$PORT
tls-cert: $WORK/tls/api.pem
tls-key: $WORK/tls/api.key
store: host=$WORK/pg port=$pgport user=vtpmd dbname=vtpmd sslmode=disable
heartbeat-window: 6s
log-level: warn
EOF
show cat "$WORK/server.yaml"
PGPASSFILE="$WORK/pgpass" "$BIN/vtpmd" server --config "$WORK/server.yaml" 2>"$WORK/server.log" &
PID[server]=$!
until_true 30 "the server's socket" vtpmctl hosts
say "up: the operator's API is the unix socket $WORK/server/api.sock"

# --- agents ---------------------------------------------------------------------

# agent NAME CAPACITY: writes the agent's configuration.
agent_config() {
	mkdir -p "$WORK/$1"
	cat >"$WORK/$1/agent.yaml" <<EOF
server: https://127.0.0.1:$PORT
server-ca: $WORK/tls/api.pem
join-token-file: $WORK/$1/join-token
host-name: $1
data-dir: $WORK/$1/data
backend: swtpm
capacity: $2
pool-size: 0
heartbeat-interval: 2s
log-level: warn
EOF
}

start_agent() {
	"$BIN/vtpmd" agent --config "$WORK/$1/agent.yaml" 2>>"$WORK/$1.log" &
	PID[agent-${1#demo-}]=$!
}

step "Enrol two hosts: a one-time join token each, carried to the host as a file"
agent_config demo-a 2
agent_config demo-b 4
for h in demo-a demo-b; do
	show vtpmctl host add "$h" --token-file "$WORK/$h/join-token" --ttl 10m
done
show_hosts
say "both down: no agent has spoken yet"
show cat "$WORK/demo-b/agent.yaml"
for h in demo-a demo-b; do
	start_agent "$h"
done
until_true 30 "demo-a up" host_is demo-a up
until_true 30 "demo-b up" host_is demo-b up
say "each agent made a key, sent a CSR with its token, and keeps its host certificate:"
show ls "$WORK/demo-b/data/host-cert"
show_hosts

# --- placement ------------------------------------------------------------------

step "Three vTPMs: each goes to the up host with the most free capacity (demo-b takes 4, demo-a 2)"
create
create
create
show vtpmctl list
[ "$(active_on demo-b)" -eq 2 ] && [ "$(active_on demo-a)" -eq 1 ] || die "want two active vTPMs on demo-b and one on demo-a"
before=$(swtpms "$WORK/demo-b")
say "swtpm processes serving demo-b's vTPMs: $before"
guest=$(vtpmctl list --host demo-b | awk 'NR == 2 { print $1 }')
say "a guest on demo-b uses its TPM, $guest: it extends PCR 16"
export TPM2TOOLS_TCTI="swtpm:path=$(data_socket "$guest")"
show tpm2_pcrextend "16:sha256=$(printf 'demo' | sha256sum | cut -d' ' -f1)"
extended=$(pcr16)
say "PCR 16 = $extended; a restarted swtpm would read zeros"

# --- a host goes away ---------------------------------------------------------------

# same_swtpms WHEN: dies unless demo-b's swtpm processes are the ones from
# before.
same_swtpms() {
	local now
	now=$(swtpms "$WORK/demo-b")
	[ "$now" = "$before" ] || die "demo-b's swtpm processes changed $1 (before: $before; now: ${now:-none})"
	[ "$(pcr16)" = "$extended" ] || die "$guest's PCR 16 changed $1"
}

step "Stop demo-b's agent (SIGTERM), as for an upgrade; its vTPMs must keep running"
show kill -TERM "${PID[agent-b]}"
wait "${PID[agent-b]}" || true
unset 'PID[agent-b]'
printf '\033[2m$ pgrep -a swtpm | grep demo-b/\033[0m\n'
pgrep -a -x swtpm | grep -F "$WORK/demo-b/" | cut -c1-120 || true
same_swtpms "when its agent stopped"
say "the agent is gone; the same $(wc -w <<<"$before") swtpm processes run ($before)"
say "waiting for the server's 6s heartbeat window to pass..."
start=$SECONDS
until_true 30 "demo-b down" host_is demo-b down
say "demo-b reads down after $((SECONDS - start))s:"
show_hosts
same_swtpms "while its host was down"
say "still the same swtpm processes; $guest's TPM answers, PCR 16 intact:"
show tpm2_pcrread sha256:16
say "demo-b takes no new vTPMs; its own stay recorded there, nothing is moved or deleted:"
show vtpmctl list --host demo-b

step "A create now lands on demo-a, the only host up"
create
say "demo-a is now full (capacity 2), so the next create is refused, saying why:"
held=$(new_instance)
if show vtpmctl create --for-project demo --instance "$held" --flavor-spec hw:tpm_version=2.0; then
	die "a create with demo-a full and demo-b down was placed"
fi

# --- the host comes back --------------------------------------------------------------

step "Start demo-b's agent again; its join token is spent, so delete it: the host certificate is enough"
show rm "$WORK/demo-b/join-token"
start_agent demo-b
until_true 30 "demo-b up" host_is demo-b up
show_hosts
show vtpmctl list --host demo-b
[ "$(active_on demo-b)" -eq 2 ] || die "demo-b's vTPMs are not all active after its agent's return"
same_swtpms "across its agent's restart"
say "the new agent adopted them: the same swtpm processes ($before), PCR 16 intact, not restarted"

step "The create refused a moment ago now lands on demo-b"
create "$held"
show vtpmctl list
[ "$(active_on demo-b)" -eq 3 ] && [ "$(active_on demo-a)" -eq 2 ] || die "want three active vTPMs on demo-b and two on demo-a"

step "Done in $SECONDS s; stopping everything and removing $WORK"
