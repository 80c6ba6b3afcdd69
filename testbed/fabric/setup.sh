#!/usr/bin/env bash
# Installs what the fabric tests need: ibsim (the InfiniBand simulator and the
# umad2sim preload), OpenSM, infiniband-diags (saquery & co. for humans) and
# libibumad (devfence loads libibumad.so.3 at run time). Idempotent; as root.
set -euo pipefail
need=()
command -v ibsim >/dev/null || need+=(ibsim-utils)
command -v opensm >/dev/null || need+=(opensm)
command -v saquery >/dev/null || need+=(infiniband-diags)
[ -e /usr/include/infiniband/umad.h ] || need+=(libibumad-dev)
[ -e /usr/lib/x86_64-linux-gnu/umad2sim/libumad2sim.so ] || need+=(ibsim-utils)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
say() { echo "devfence fabric: $*" >&2; }
say "installing ${need[*]} (needed by the OpenSM tests: each starts a real OpenSM on an ibsim fabric) …"
export DEBIAN_FRONTEND=noninteractive
apt-get update -o DPkg::Lock::Timeout=600 >/dev/null
apt-get install -y -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null
# The package's opensm.service must not run: each test starts its own OpenSM.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  say "disabling opensm.service (each test starts its own OpenSM; a system one would answer instead) …"
  systemctl disable --now opensm.service >/dev/null 2>&1 || true
fi
say "installed"
