#!/usr/bin/env bash
# testbed/run.sh - run a script as root inside a throw-away QEMU guest that has
# a virtual Intel IOMMU (real IOMMU groups), SR-IOV NICs and NVMe, vfio-pci,
# VFIO type1 and the mtty mdev driver, on a stock Debian kernel.
#
# usage: testbed/run.sh [-k 6.1|6.12] [-s SHARE_DIR] [-t TIMEOUT] [-o LOG] [-a auto|kvm|tcg] GUEST_SCRIPT
#
#   GUEST_SCRIPT  runs as /tests/run in the guest (busybox sh, root); its exit
#                 status becomes this script's exit status (0..127).
#   -k SERIES     guest kernel: 6.1 (bookworm, default) or 6.12 (bookworm-backports)
#   -s DIR        host directory shared read-only at /mnt/host in the guest (virtio-9p)
#   -t SECONDS    wall-clock limit for the whole boot (default 600)
#   -o LOG        also write the serial console to LOG
#   -a ACCEL      auto (default): kvm only with kvm_intel/kvm_amd loaded and a usable
#                 /dev/kvm, else tcg; or kvm, tcg. (The kvm path is untested: no KVM here.)
#
# Exit status: the guest script's status; 124 timeout; 125 the guest never
# reported a status (kernel panic, init crash); 126 setup error (run
# testbed/setup.sh first).
#
# Env: TESTBED_CACHE      cache made by setup.sh (default ${XDG_CACHE_HOME:-$HOME/.cache}/devfence-testbed)
#      TESTBED_APPEND     extra kernel command line (e.g. iommu=pt, testbed.filter=NAME)
#      TESTBED_QEMU_ARGS  extra QEMU arguments (split on spaces)
#      TESTBED_BZIMAGE=1  boot the compressed bzImage instead of the PVH vmlinux
#      TESTBED_SMP=N      guest CPUs (default 2)
#      TESTBED_TCG_THREAD=single|multi  TCG threading (default single: multi can abort QEMU)
#      TESTBED_QEMU_RETRIES=N  boot again up to N times (default 1) if QEMU crashes
#                         before the guest reported (an emulator bug, not a test result)
#
# Guest topology (fixed here; exported to guest scripts by guest/lib.sh as
# TESTBED_*; the same IOMMU groups on 6.1 and 6.12; docs/testbed.md has more):
#   group 1-5  00:01.0-00:05.0  PCIe root ports
#   group 8    01:00.0 igb (82576 PF, 7 VFs; VFs 01:10.0, 01:10.2, ... get groups 12+)
#   group 9    02:00.0 igb (82576 PF, 7 VFs)
#   group 10   03:00.0 nvme (SR-IOV, 2 VFs: 03:00.1, 03:00.2)
#   group 4    00:04.0 root port with disable-acs=on + 04:00.0 igb + its VFs 04:10.*
#   group 11   05:00.0 + 05:00.1 e1000e (multifunction, no ACS)
#   group 6    00:10.0 virtio-9p: SHARE_DIR (or an empty directory) at /mnt/host

# shellcheck disable=SC2054 # QEMU's -device options are comma-separated on purpose
set -euo pipefail

PROG=testbed/run.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=testbed/common.sh
. "$HERE/common.sh"
TB_DIE_STATUS=126

# the comment block at the top of this file
help() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; }
usage() { help; exit 126; }
KSEL=6.1 SHARE="" TIMEOUT=600 LOG="" ACCEL=auto
while getopts k:s:t:o:a:h opt; do
	case $opt in
	k) KSEL=$OPTARG ;;
	s) SHARE=$OPTARG ;;
	t) TIMEOUT=$OPTARG ;;
	o) LOG=$OPTARG ;;
	a) ACCEL=$OPTARG ;;
	h) help; exit 0 ;;
	*) usage ;;
	esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] || usage
SCRIPT=$1

# --- check the arguments and the cache -------------------------------------------
testbed_suites_for "$KSEL" >/dev/null || tb_die "unknown kernel series '$KSEL'" "use -k with one of: ${TESTBED_SERIES[*]}"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || tb_die "timeout '$TIMEOUT' is not a positive number of seconds"
case $ACCEL in auto | kvm | tcg) ;; *) tb_die "unknown accelerator '$ACCEL'" "use -a auto, kvm or tcg" ;; esac
[ -f "$SCRIPT" ] || tb_die "guest script '$SCRIPT' not found"
if [ -n "$SHARE" ]; then
	[ -d "$SHARE" ] || tb_die "share directory '$SHARE' not found"
	SHARE=$(cd "$SHARE" && pwd)
	[[ $SHARE != *,* ]] || tb_die "the share path '$SHARE' contains a comma, which QEMU's -fsdev cannot take"
fi
KDIR=$TESTBED_CACHE/kernel-$KSEL
{ [ -f "$KDIR/vmlinuz" ] && [ -f "$KDIR/testbed-versions.txt" ]; } ||
	tb_die "no $KSEL guest kernel in $TESTBED_CACHE" "run testbed/setup.sh first (same TESTBED_CACHE)"
# a shared lock: setup.sh does not replace a kernel while it is being used
exec 9<"$TESTBED_CACHE"
flock -s 9
KDIR=$(cd "$KDIR" && pwd -P)
KVER=$(basename "$KDIR")
command -v qemu-system-x86_64 >/dev/null || tb_die "qemu-system-x86_64 is not installed" "run testbed/setup.sh"
[[ $(qemu-system-x86_64 -device help 2>&1) == *'"igb"'* ]] ||
	tb_die "this qemu-system-x86_64 has no igb device (QEMU >= 8 is needed)" "run testbed/setup.sh (installs QEMU from bookworm-backports)"
BUSYBOX=$(command -v busybox) || tb_die "busybox is not installed" "run testbed/setup.sh (installs busybox-static)"
[[ $(LC_ALL=C ldd "$BUSYBOX" 2>&1) == *"not a dynamic"* ]] ||
	tb_die "$BUSYBOX is not statically linked" "install busybox-static (testbed/setup.sh does)"

# --- the fixed topology: QEMU devices and the names guest scripts get ------------------
TOPOLOGY=(
	-device pcie-root-port,id=rp1,bus=pcie.0,addr=0x1,chassis=1,slot=1
	-device igb,bus=rp1,id=igb1
	-device pcie-root-port,id=rp2,bus=pcie.0,addr=0x2,chassis=2,slot=2
	-device igb,bus=rp2,id=igb2
	-device pcie-root-port,id=rp3,bus=pcie.0,addr=0x3,chassis=3,slot=3
	-device nvme-subsys,id=nvsub0
	-device nvme,bus=rp3,id=nvme0,serial=tb0001,subsys=nvsub0,sriov_max_vfs=2,sriov_vq_flexible=4,sriov_vi_flexible=2,max_ioqpairs=6,msix_qsize=4
	# a root port without ACS: the port, the PF and all its VFs share one group
	-device pcie-root-port,id=rp4,bus=pcie.0,addr=0x4,chassis=4,slot=4,disable-acs=on
	-device igb,bus=rp4,id=igb3
	# a multifunction device without ACS: both functions share one group
	-device pcie-root-port,id=rp5,bus=pcie.0,addr=0x5,chassis=5,slot=5
	-device e1000e,bus=rp5,addr=0.0,multifunction=on,id=mf0
	-device e1000e,bus=rp5,addr=0.1,id=mf1
)
TOPOLOGY_ENV="# written by testbed/run.sh: the guest's fixed PCI topology
TESTBED_IGB_PF=0000:01:00.0
TESTBED_IGB_PF2=0000:02:00.0
TESTBED_NVME_PF=0000:03:00.0
TESTBED_NOACS_PORT=0000:00:04.0
TESTBED_NOACS_PF=0000:04:00.0
TESTBED_MF_FN0=0000:05:00.0
TESTBED_MF_FN1=0000:05:00.1"

# --- initramfs ----------------------------------------------------------------------
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/devfence-testbed.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
trap 'exit 130' INT TERM
ROOT=$STAGE/root
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,run,root,mnt,etc,tests,testbed}
cp "$BUSYBOX" "$ROOT/bin/busybox"
cp "$HERE/guest/init" "$ROOT/init"
cp "$HERE/guest/lib.sh" "$ROOT/testbed/lib.sh"
printf '%s\nTESTBED_SERIES=%s\n' "$TOPOLOGY_ENV" "$KSEL" >"$ROOT/testbed/topology.env"
cp "$SCRIPT" "$ROOT/tests/run"
chmod 755 "$ROOT/init" "$ROOT/tests/run"
# the modules setup.sh selected (decompressed, with modules.dep) and mtty.ko
cp -a "$KDIR/root/." "$ROOT/"
(cd "$ROOT" && find . | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null | gzip -1) >"$STAGE/initrd.gz"

# --- accelerator and kernel -------------------------------------------------------------
if [ "$ACCEL" = auto ]; then
	ACCEL=tcg
	# /dev/kvm alone is not enough: kvm_pvm (nested software virtualization)
	# cannot boot stock kernels. Require hardware virtualization.
	if [ -r /dev/kvm ] && [ -w /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
		ACCEL=kvm
	fi
fi
if [ "$ACCEL" = kvm ]; then
	ACCEL_ARGS=(-accel kvm -cpu host)
else
	# Single-threaded TCG: with multi-threaded TCG (QEMU's default for x86 on
	# x86) and 2 vCPUs, QEMU 10.0 sometimes aborts early in the boot with
	# "iotlb_to_section: Assertion `section_index < d->map.sections_nb' failed"
	# (a race between a vCPU and a memory map update; seen here once in ~45 boots).
	ACCEL_ARGS=(-accel "tcg,thread=${TESTBED_TCG_THREAD:-single}" -cpu max)
fi
KERNEL=$KDIR/vmlinuz
# The uncompressed kernel boots through PVH and skips the decompression.
[ "${TESTBED_BZIMAGE:-0}" = 1 ] || [ ! -f "$KDIR/vmlinux" ] || KERNEL=$KDIR/vmlinux

# The 9p device is always there (sharing an empty directory without -s), so
# that the guest's PCI topology and IOMMU group numbers do not depend on -s.
if [ -z "$SHARE" ]; then SHARE_PATH=$STAGE/empty && mkdir "$SHARE_PATH"; else SHARE_PATH=$SHARE; fi
SHARE_ARGS=(-fsdev "local,id=share,path=$SHARE_PATH,security_model=none,readonly=on"
	-device virtio-9p-pci,fsdev=share,mount_tag=hostshare,bus=pcie.0,addr=0x10)
APPEND="console=ttyS0 loglevel=4 panic=-1 edd=off intel_iommu=on testbed.9p=hostshare ${TESTBED_APPEND:-}"
read -ra EXTRA <<<"${TESTBED_QEMU_ARGS:-}"

QEMU=(qemu-system-x86_64 -nodefaults -display none -no-reboot
	-machine q35,kernel-irqchip=split "${ACCEL_ARGS[@]}" -m 1G -smp "${TESTBED_SMP:-2}"
	-device intel-iommu,intremap=on,caching-mode=on
	"${TOPOLOGY[@]}" "${SHARE_ARGS[@]}"
	-device isa-debug-exit,iobase=0xf4,iosize=0x04
	"${EXTRA[@]}"
	-serial stdio
	-kernel "$KERNEL" -initrd "$STAGE/initrd.gz" -append "$APPEND")

# --- boot -------------------------------------------------------------------------------
SERIAL=$STAGE/serial.log
# If QEMU itself crashes (killed by a signal other than the timeout's) before
# the guest reported, boot again, at most TESTBED_QEMU_RETRIES (default 1)
# more times: that is an emulator bug, not a test result.
tries=$((1 + ${TESTBED_QEMU_RETRIES:-1}))
while :; do
	tb_say "booting $KVER ($ACCEL, $(basename "$KERNEL")), guest script $SCRIPT${SHARE:+, share $SHARE}, timeout ${TIMEOUT}s"
	start=$(date +%s%N)
	set +e
	# QEMU's stdin is /dev/null: CI has no terminal, and by hand the serial
	# console must not take over the terminal. `timeout` ends QEMU at the limit.
	# The "nic ... has no peer" warnings: the NICs are not connected to anything, on purpose.
	timeout -k 5 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 | grep --line-buffered -v 'has no peer$' | tee "$SERIAL"
	codes=("${PIPESTATUS[@]}")
	set -e
	qrc=${codes[0]}
	wall=$(($(date +%s%N) - start))
	wall=$((wall / 1000000000)).$((wall / 100000000 % 10))
	tries=$((tries - 1))
	if [ "$qrc" -gt 128 ] && [ "$qrc" != 137 ] && [ "$tries" -gt 0 ] && ! grep -q 'TESTBED: exit status' "$SERIAL"; then
		tb_say "warning: QEMU died of signal $((qrc - 128)) after ${wall}s, before the guest reported; booting again"
		continue
	fi
	break
done
[ -z "$LOG" ] || cp "$SERIAL" "$LOG"

# isa-debug-exit makes QEMU exit with (status << 1) | 1. A QEMU that could not
# start also exits with 1, so the guest's own report is required too.
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
	status=124 why="timed out after ${TIMEOUT}s"
elif ! grep -q 'TESTBED: init up' "$SERIAL"; then
	if [ "$qrc" = 1 ]; then status=126 why="QEMU failed to start (status $qrc)"; else status=125 why="the guest never reached /init (QEMU status $qrc)"; fi
elif ! grep -q 'TESTBED: exit status' "$SERIAL" || [ $((qrc % 2)) = 0 ]; then
	status=125 why="the guest never reported a status (kernel panic or init crash; QEMU status $qrc)"
else
	status=$(((qrc - 1) / 2)) why="guest script exited with $(((qrc - 1) / 2))"
fi
tb_say "kernel $KVER ($ACCEL): $why; wall ${wall}s${LOG:+; serial log $LOG}"
case $status in
124) tb_say "hint: raise -t, or look at the serial console above for where the guest stopped" ;;
125) tb_say "hint: look for 'Kernel panic' or a crashed /init on the serial console above" ;;
126) tb_say "hint: QEMU's own error message is above" ;;
esac
exit "$status"
