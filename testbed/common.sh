# shellcheck shell=bash disable=SC2034 # the variables are used by the scripts that source this file
# testbed/common.sh - definitions shared by setup.sh and run.sh (sourced, not run).
#
# The testbed keeps everything it downloads or builds in one cache directory:
#
#   $TESTBED_CACHE/
#     kernels/<KVER>/            one Debian kernel, from its .debs (nothing installed)
#       vmlinuz                  its bzImage
#       vmlinux                  the same kernel uncompressed (run.sh boots it through PVH)
#       config                   its kernel configuration
#       root/lib/modules/<KVER>/ TESTBED_MODULES and their dependencies, decompressed,
#                                extra/mtty.ko (built out of tree), modules.dep
#       testbed-versions.txt     package=version of everything used for this kernel
#       testbed-modules.txt      the TESTBED_MODULES it was made with
#     kernel-6.1  -> kernels/6.1.0-NN-amd64            (symlink, set by setup.sh)
#     kernel-6.12 -> kernels/6.12.NN+deb12-amd64       (symlink, set by setup.sh)
#     logs/                      apt, download and build logs of setup.sh

# The Debian release the testbed is built for. The kernel series and the
# backports suite below are specific to it.
TESTBED_CODENAME=bookworm
TESTBED_BACKPORTS=${TESTBED_CODENAME}-backports

# Kernel series the testbed supports (the -k argument of run.sh).
TESTBED_SERIES=(6.1 6.12)

: "${HOME:=$(getent passwd "$(id -u)" | cut -d: -f6)}" # CI may run without HOME
TESTBED_CACHE=${TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/devfence-testbed}

# Kernel modules put into the guest's initramfs (their dependencies are added
# from modules.dep). mtty.ko is added separately.
TESTBED_MODULES="vfio vfio_iommu_type1 vfio_pci vfio_pci_core mdev igb igbvf e1000e nvme
virtio_pci 9pnet_virtio 9p"

# Apt suites a series' linux-image-amd64 metapackage is taken from.
testbed_suites_for() {
	case $1 in
	6.1) echo "$TESTBED_CODENAME $TESTBED_CODENAME-security $TESTBED_CODENAME-updates" ;;
	6.12) echo "$TESTBED_BACKPORTS" ;;
	*) return 1 ;;
	esac
}

# Messages. PROG is set by the sourcing script.
tb_say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
# tb_die MESSAGE [HINT]: print an error (and a hint) and exit with $TB_DIE_STATUS (default 1).
tb_die() {
	TB_DIED=1
	printf '%s: error: %s\n' "$PROG" "$1" >&2
	[ $# -lt 2 ] || printf '%s: hint: %s\n' "$PROG" "$2" >&2
	exit "${TB_DIE_STATUS:-1}"
}

# Seconds since the script started, with one decimal.
TB_T0=$(date +%s%N)
tb_elapsed() { local ns=$(($(date +%s%N) - TB_T0)); printf '%d.%d' $((ns / 1000000000)) $((ns / 100000000 % 10)); }
