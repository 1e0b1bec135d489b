#!/usr/bin/env bash
# Brings up libvirtd and virtlogd for the libvirt backend's tests on a Debian
# machine without systemd (as CI and these sandboxes are): installs what is
# missing, creates what libvirt's defaults look up, runs QEMU as
# libvirt-qemu and swtpm as tss (Debian's defaults, so the tests see the
# permissions a real host has), starts the daemons, and waits until
# libvirtd answers. Idempotent: a second run changes nothing and returns at
# once.
#
# libvirt-qemu is in the group kvm, as Debian's libvirt-daemon-system makes
# it: where /dev/kvm exists (root:kvm 0660) and QEMU's user cannot open it,
# libvirt finds its cached QEMU capabilities stale on every call and probes
# QEMU again (seconds per call), and the libvirt tests time out. libvirt
# decides whether KVM is usable once per change of /dev/kvm, so a change of
# groups needs a restart of libvirtd. The test guests run under TCG either
# way.
#
# The daemons are found, and libvirtd stopped, by the pid files they write
# as root (/run/libvirtd.pid, /run/virtlogd.pid), never by process name.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || exec sudo "$0" "$@"

packages=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 ovmf cpio libxml2-utils)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "libvirtd-up: installing ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt /etc/libvirt
getent group kvm >/dev/null || { groupadd -r kvm; echo "libvirtd-up: created group kvm"; }
getent group libvirt-qemu >/dev/null || { groupadd -r libvirt-qemu; echo "libvirtd-up: created group libvirt-qemu"; }
id libvirt-qemu >/dev/null 2>&1 || { useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu; echo "libvirtd-up: created user libvirt-qemu"; }
restart=
if [[ " $(id -nG libvirt-qemu) " != *" kvm "* ]]; then
	usermod -aG kvm libvirt-qemu
	echo "libvirtd-up: added libvirt-qemu to the group kvm"
	restart=yes
fi

getent passwd tss >/dev/null || { echo "libvirtd-up: no user tss (swtpm-tools makes it; run scripts/deps.sh)" >&2; exit 1; }

conf=/etc/libvirt/qemu.conf
touch "$conf"
for kv in 'user = "libvirt-qemu"' 'group = "libvirt-qemu"'; do
	key=${kv%% *}
	grep -qx "$kv" "$conf" && continue
	sed -i "/^${key} = /d" "$conf"
	echo "$kv" >>"$conf"
	echo "libvirtd-up: $conf: $kv"
	restart=yes
done
# swtpm_user and swtpm_group go through the product's own command.
out=$(go run ./cmd/vtpmd agent configure-host --swtpm-user tss --swtpm-group tss --qemu-conf "$conf")
echo "$out" | sed 's/^/libvirtd-up: /'
[[ $out == *"restart libvirtd"* ]] && restart=yes
# running PIDFILE NAME: the pid in PIDFILE is a live process called NAME
# (a pid file left by a crash may name a pid reused since).
running() {
	local pid
	pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
libvirtd_pid=/run/libvirtd.pid virtlogd_pid=/run/virtlogd.pid
if [ -n "$restart" ] && running "$libvirtd_pid" libvirtd; then
	pid=$(cat "$libvirtd_pid")
	kill "$pid"
	for _ in $(seq 300); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
	if [ -d "/proc/$pid" ]; then
		echo "libvirtd-up: libvirtd ($pid) did not stop in 30 s" >&2
		exit 1
	fi
	echo "libvirtd-up: stopped libvirtd ($pid) to apply the changes"
elif [ -n "$restart" ] && virsh -c qemu:///system version >/dev/null 2>&1; then
	echo "libvirtd-up: a libvirtd without $libvirtd_pid runs: restart it yourself to apply the changes" >&2
fi

if ! running "$virtlogd_pid" virtlogd; then virtlogd -d -p "$virtlogd_pid"; echo "libvirtd-up: started virtlogd"; fi
if ! running "$libvirtd_pid" libvirtd; then libvirtd -d -p "$libvirtd_pid"; echo "libvirtd-up: started libvirtd"; fi
for _ in $(seq 100); do
	virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
	sleep 0.1
done
echo "libvirtd-up: libvirtd does not answer" >&2
exit 1
