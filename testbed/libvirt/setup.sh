#!/usr/bin/env bash
# Installs what the libvirt hook test needs: libvirtd with its QEMU driver and
# virsh (Debian 12's libvirt 9.0), and the kvm group and libvirt-qemu user the
# QEMU driver refuses to start without. Idempotent; as root. It starts no
# daemon: each test starts its own libvirtd in a private mount and pid
# namespace (crates/devfence/tests/libvirt.rs) and stops it again.
set -euo pipefail
say() { echo "devfence libvirt: $*" >&2; }
need=()
command -v libvirtd >/dev/null || need+=(libvirt-daemon)
[ -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] ||
  need+=(libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || need+=(libvirt-clients)
# The agent's unit test runs `systemd-analyze verify` on dist/systemd/devfence.service
# (crates/devfence/tests/agent_unit.rs), which checks its ExecReload's /bin/kill.
command -v systemd-analyze >/dev/null || need+=(systemd)
[ -x /bin/kill ] || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} (needed by the libvirt hook test: a real libvirtd calls devfence's hook) …"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -o DPkg::Lock::Timeout=600 >/dev/null
  apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null
  # Packages may start the system daemons where systemd runs: the tests start
  # their own, so the system's must not hold the hook or the sockets.
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    say "disabling libvirtd.service and its sockets (each test starts its own libvirtd) …"
    systemctl disable --now libvirtd.service libvirtd.socket libvirtd-ro.socket \
      libvirtd-admin.socket virtlogd.socket virtlockd.socket >/dev/null 2>&1 || true
  fi
fi
if ! getent group kvm >/dev/null; then
  say "adding the group kvm (libvirt's QEMU driver needs it) …"
  groupadd -r kvm
fi
if ! getent group libvirt-qemu >/dev/null; then
  say "adding the group libvirt-qemu (libvirt's QEMU driver needs it) …"
  groupadd -r libvirt-qemu
fi
if ! id libvirt-qemu >/dev/null 2>&1; then
  say "adding the user libvirt-qemu (libvirt's QEMU driver refuses to start without it) …"
  useradd -r -g kvm libvirt-qemu
fi
say "libvirtd $(libvirtd --version | awk '{print $NF}'), virsh and the QEMU driver are installed"
