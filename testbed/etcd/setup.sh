#!/usr/bin/env bash
# Installs what the fleet crate needs: protoc (etcd-client compiles etcd's .proto
# files in its build script, so `cargo build` needs it) and etcd itself (the fleet
# tests start a real 3-member etcd cluster on loopback per test). Idempotent; as root.
set -euo pipefail
need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
say() { echo "devfence etcd: $*" >&2; }
say "installing ${need[*]} (protoc builds etcd-client; the fleet tests start a real etcd cluster per test) …"
export DEBIAN_FRONTEND=noninteractive
apt-get update -o DPkg::Lock::Timeout=600 >/dev/null
apt-get install -y -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null
# The package's etcd.service must not run: each test starts its own cluster on free ports.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  say "disabling etcd.service (each test starts its own cluster) …"
  systemctl disable --now etcd.service >/dev/null 2>&1 || true
fi
say "installed"
