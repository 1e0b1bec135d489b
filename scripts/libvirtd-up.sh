#!/usr/bin/env bash
# Brings up libvirtd and virtlogd for the libvirt backend's tests on a Debian
# machine without systemd (as CI and these sandboxes are): installs what is
# missing, creates what libvirt's defaults look up, runs QEMU as
# libvirt-qemu and swtpm as tss (Debian's defaults, so the tests see the
# permissions a real host has), starts the daemons, and waits until
# libvirtd answers. Idempotent: a second run changes nothing and returns at
# once.
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
id libvirt-qemu >/dev/null 2>&1 || { useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu; echo "libvirtd-up: created user libvirt-qemu"; }

getent passwd tss >/dev/null || { echo "libvirtd-up: no user tss (swtpm-tools makes it; run scripts/deps.sh)" >&2; exit 1; }

conf=/etc/libvirt/qemu.conf
touch "$conf"
restart=
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
if [ -n "$restart" ] && pgrep -x libvirtd >/dev/null; then
	pkill -x libvirtd
	while pgrep -x libvirtd >/dev/null; do sleep 0.1; done
fi

if ! pgrep -x virtlogd >/dev/null; then virtlogd -d; echo "libvirtd-up: started virtlogd"; fi
if ! pgrep -x libvirtd >/dev/null; then libvirtd -d; echo "libvirtd-up: started libvirtd"; fi
for _ in $(seq 100); do
	virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
	sleep 0.1
done
echo "libvirtd-up: libvirtd does not answer" >&2
exit 1
