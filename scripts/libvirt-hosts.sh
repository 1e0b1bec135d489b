#!/usr/bin/env bash
# Two libvirt hosts on this one machine, for the live migration tests:
# vtpm-h1 and vtpm-h2, each a libvirtd and virtlogd in its own mount, UTS
# and network namespaces, with its own /etc/libvirt, /var/lib/libvirt,
# /run/libvirt, /var/log/libvirt and /var/cache/libvirt (bind mounts of
# $root/HOST/{etc,lib,run,log,cache}), its own hostname and host UUID. The two
# network namespaces are joined by a veth pair, 10.231.0.1 and 10.231.0.2,
# addresses that exist only there; each libvirtd listens on TCP (no auth:
# nothing outside the pair can reach it) so either can migrate a guest to
# the other peer-to-peer (qemu+tcp://10.231.0.N/system), and QEMU's
# migration stream goes over the same link.
#
# Both hosts are namespaced, rather than one of them being the system
# libvirtd: that one is shared with the other tests and listens on no
# socket a peer could reach, and a pair of namespaced hosts goes away
# completely at down.
#
# Everything else (the test guests' kernel, initrd, NVRAM and console,
# vtpmd's own swtpm sockets in external mode) is on the machine's file
# systems, which both hosts see, as shared storage. Each host's libvirtd
# socket is reachable from outside at $root/HOST/run/libvirt-sock, which
# is what the hosts' vtpmd agents dial.
#
#   libvirt-hosts.sh up     idempotent: a second run changes nothing
#   libvirt-hosts.sh down   destroys the hosts' guests, stops the daemons,
#                           removes the namespaces, mounts and directories
#   libvirt-hosts.sh exec HOST CMD...   runs CMD inside HOST's namespaces
#
# The daemons are found by the pid files they write in their hosts' own
# /run/libvirt, never by process name.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || exec sudo "$0" "$@"

root=${VTPMD_LIBVIRT_HOSTS:-/run/vtpmd-hosts}
hosts=(vtpm-h1 vtpm-h2)
declare -A addr=([vtpm-h1]=10.231.0.1 [vtpm-h2]=10.231.0.2)
declare -A uuid=([vtpm-h1]=6c1e0a57-7d4e-4f3a-9b1d-0000000000a1 [vtpm-h2]=6c1e0a57-7d4e-4f3a-9b1d-0000000000a2)
# The directories each host has of its own, and their names under $root/HOST.
declare -A private=([etc]=/etc/libvirt [lib]=/var/lib/libvirt [run]=/run/libvirt [log]=/var/log/libvirt [cache]=/var/cache/libvirt)

say() { echo "libvirt-hosts: $*"; }

# running PIDFILE NAME: the pid in PIDFILE is a live process called NAME.
running() {
	local pid
	pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# inhost HOST CMD...: runs CMD in HOST's mount, UTS and network namespaces.
inhost() {
	local h=$1
	shift
	nsenter --mount="$root/$h.mnt" --uts="$root/$h.uts" --net="/run/netns/$h" -- "$@"
}

# mounted PATH: PATH is a mount point of this mount namespace.
mounted() { findmnt -rn --mountpoint "$1" >/dev/null; }

up() {
	# The packages, users and system settings are libvirtd-up.sh's.
	grep -q '^swtpm_user = ' /etc/libvirt/qemu.conf 2>/dev/null || {
		say "libvirt is not set up on this machine: run scripts/libvirtd-up.sh first" >&2
		exit 1
	}
	mkdir -p "$root"
	# Persistent namespace files must live on a private mount.
	if ! mounted "$root"; then
		mount --bind "$root" "$root"
		mount --make-private "$root"
	fi
	for h in "${hosts[@]}"; do
		[ -e "/run/netns/$h" ] || { ip netns add "$h"; say "network namespace $h"; }
		ip -n "$h" link set lo up
	done
	if ! ip -n vtpm-h1 link show vh-peer >/dev/null 2>&1; then
		ip link add vh-peer netns vtpm-h1 type veth peer name vh-peer netns vtpm-h2
		say "veth pair between vtpm-h1 and vtpm-h2"
	fi
	for h in "${hosts[@]}"; do
		ip -n "$h" addr replace "${addr[$h]}/24" dev vh-peer
		ip -n "$h" link set vh-peer up
		host "$h"
	done
	for h in "${hosts[@]}"; do
		for _ in $(seq 300); do
			inhost "$h" virsh -c qemu:///system version >/dev/null 2>&1 && continue 2
			sleep 0.1
		done
		say "libvirtd of $h does not answer" >&2
		exit 1
	done
}

# host HOST: HOST's directories, namespaces, configuration and daemons.
host() {
	local h=$1 d=$root/$1
	mkdir -p "$d"
	for p in "${!private[@]}"; do mkdir -p "$d/$p" "${private[$p]}"; done
	if [ ! -e "$d/etc/qemu.conf" ]; then
		# The system's settings (QEMU's and swtpm's users), no domains or
		# secrets of the system libvirtd's.
		cp /etc/libvirt/qemu.conf /etc/libvirt/libvirt.conf "$d/etc/"
		cat >>"$d/etc/qemu.conf" <<-EOF
			# $h: migration over the veth pair; no cgroups (the hosts share
			# the machine's, and their domains' names and ids may meet);
			# no remembered owners (the hosts share the guests' files).
			migration_address = "${addr[$h]}"
			migration_host = "${addr[$h]}"
			cgroup_controllers = [ ]
			remember_owner = 0
		EOF
		cat >"$d/etc/libvirtd.conf" <<-EOF
			host_uuid = "${uuid[$h]}"
			listen_tls = 0
			listen_tcp = 1
			listen_addr = "${addr[$h]}"
			auth_tcp = "none"
			unix_sock_group = "root"
		EOF
		mkdir -p "$d/lib/swtpm" "$d/lib/qemu"
		say "configuration of $h in $d/etc"
	fi
	if [ ! -e "$root/$h.mnt" ] || ! mounted "$root/$h.mnt"; then
		touch "$root/$h.mnt" "$root/$h.uts"
		local binds=""
		for p in "${!private[@]}"; do binds+="mount --bind $d/$p ${private[$p]}; "; done
		unshare --mount="$root/$h.mnt" --uts="$root/$h.uts" --propagation private \
			sh -c "hostname $h; $binds"
		say "mount and UTS namespaces of $h"
	fi
	if ! running "$d/run/virtlogd.pid" virtlogd; then
		inhost "$h" virtlogd -d -p /run/libvirt/virtlogd.pid
		say "started virtlogd of $h"
	fi
	if ! running "$d/run/libvirtd.pid" libvirtd; then
		inhost "$h" libvirtd -d --listen -p /run/libvirt/libvirtd.pid -f /etc/libvirt/libvirtd.conf
		say "started libvirtd of $h"
	fi
}

# stop PIDFILE NAME: stops the daemon and waits until it is gone.
stop() {
	running "$1" "$2" || return 0
	local pid
	pid=$(cat "$1")
	kill "$pid"
	for _ in $(seq 300); do [ -d "/proc/$pid" ] || return 0; sleep 0.1; done
	say "$2 ($pid) did not stop in 30 s" >&2
	return 1
}

down() {
	for h in "${hosts[@]}"; do
		local d=$root/$h
		if running "$d/run/libvirtd.pid" libvirtd; then
			for dom in $(inhost "$h" virsh -c qemu:///system list --name); do
				inhost "$h" virsh -c qemu:///system destroy "$dom" >/dev/null
			done
		fi
		stop "$d/run/libvirtd.pid" libvirtd
		stop "$d/run/virtlogd.pid" virtlogd
		for ns in "$root/$h.mnt" "$root/$h.uts"; do
			! mounted "$ns" || umount "$ns"
		done
		[ ! -e "/run/netns/$h" ] || ip netns del "$h"
	done
	! mounted "$root" || umount "$root"
	rm -rf "$root"
	say "down"
}

case ${1:-} in
up) up ;;
down) down ;;
exec)
	shift
	inhost "$@"
	;;
*)
	echo "usage: $0 up | down | exec HOST CMD..." >&2
	exit 2
	;;
esac
