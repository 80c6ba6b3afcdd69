# shellcheck shell=sh
# testbed/guest/lib.sh - helpers for guest scripts (busybox ash). run.sh puts
# this file at /testbed/lib.sh in the guest; a guest script sources it:
#
#   . /testbed/lib.sh
#
# It exports:
#   TESTBED=1, TESTBED_KERNEL (uname -r), TESTBED_SERIES (6.1 or 6.12)
#   the fixed topology from /testbed/topology.env (written by run.sh):
#     TESTBED_IGB_PF, TESTBED_IGB_PF2, TESTBED_NVME_PF, TESTBED_NOACS_PORT,
#     TESTBED_NOACS_PF, TESTBED_MF_FN0, TESTBED_MF_FN1 (full BDFs, 0000:bb:dd.f)
#   TESTBED_<KEY>=VALUE for every testbed.<key>=VALUE on the kernel command
#     line (e.g. TESTBED_APPEND=testbed.filter=bind on the host gives
#     TESTBED_FILTER=bind here)
# and defines the tb_* functions below. Nothing here sleeps for a fixed time:
# waiting is polling with a deadline (tb_wait).

set -a
# shellcheck source=/dev/null
. /testbed/topology.env
set +a
TESTBED=1
TESTBED_KERNEL=$(uname -r)
export TESTBED TESTBED_KERNEL
# shellcheck disable=SC2013 # the command line is split into words on purpose
for _tb_arg in $(cat /proc/cmdline); do
	case $_tb_arg in
	testbed.*=*)
		_tb_key=${_tb_arg%%=*}
		_tb_key=$(echo "${_tb_key#testbed.}" | tr 'a-z.-' 'A-Z__')
		case $_tb_key in *[!A-Z0-9_]*) continue ;; esac
		export "TESTBED_$_tb_key=${_tb_arg#*=}" ;;
	esac
done
unset _tb_arg _tb_key

# tb_now_ms: milliseconds since boot (from /proc/uptime, 10 ms resolution).
tb_now_ms() {
	read -r _tb_up _tb_idle </proc/uptime
	_tb_frac=${_tb_up#*.}
	echo $((${_tb_up%.*} * 1000 + ${_tb_frac#0} * 10))
}

# tb_wait SECONDS COMMAND...: run COMMAND every 20 ms until it succeeds.
# Returns 1 (and says what it waited for) if SECONDS pass first.
tb_wait() {
	_tb_deadline=$(($(tb_now_ms) + $1 * 1000))
	shift
	until "$@"; do
		if [ "$(tb_now_ms)" -ge "$_tb_deadline" ]; then
			echo "TESTBED: timed out waiting for: $*" >&2
			return 1
		fi
		usleep 20000
	done
}

# tb_modprobe MODULE [PARAM=VALUE...]: load a module, saying so if that fails.
tb_modprobe() {
	modprobe "$@" || { echo "TESTBED: modprobe $* failed" >&2; return 1; }
}

# tb_driver BDF: the driver bound to a PCI function, or "none".
tb_driver() {
	if [ -e "/sys/bus/pci/devices/$1/driver" ]; then
		basename "$(readlink "/sys/bus/pci/devices/$1/driver")"
	else
		echo none
	fi
}

# tb_group BDF: the IOMMU group number of a PCI function, or "none".
tb_group() {
	if [ -e "/sys/bus/pci/devices/$1/iommu_group" ]; then
		basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")"
	else
		echo none
	fi
}

# tb_set_numvfs PF N [SECONDS]: set sriov_numvfs of PF to N (through 0 when
# changing a non-zero count, as the kernel requires) and wait until the N
# virtfn links exist and every VF has an IOMMU group (default 30 s).
tb_set_numvfs() {
	_tb_pf=/sys/bus/pci/devices/$1
	if [ "$(cat "$_tb_pf/sriov_numvfs")" != 0 ] && [ "$2" != 0 ]; then
		echo 0 >"$_tb_pf/sriov_numvfs" || return 1
	fi
	echo "$2" >"$_tb_pf/sriov_numvfs" || return 1
	tb_wait "${3:-30}" _tb_vfs_ready "$_tb_pf" "$2"
}
_tb_vfs_ready() {
	_tb_i=0
	while [ "$_tb_i" -lt "$2" ]; do
		[ -e "$1/virtfn$_tb_i/iommu_group" ] || return 1
		_tb_i=$((_tb_i + 1))
	done
	[ ! -e "$1/virtfn$2" ]
}

# tb_bind BDF DRIVER [SECONDS]: bind a PCI function to DRIVER the way devfence
# does (driver_override, unbind, drivers_probe) and wait for the driver link.
tb_bind() {
	_tb_dev=/sys/bus/pci/devices/$1
	echo "$2" >"$_tb_dev/driver_override" || return 1
	if [ -e "$_tb_dev/driver" ]; then echo "$1" >"$_tb_dev/driver/unbind" || return 1; fi
	echo "$1" >/sys/bus/pci/drivers_probe
	tb_wait "${3:-10}" _tb_bound "$1" "$2"
}
_tb_bound() { [ "$(tb_driver "$1")" = "$2" ]; }

# tb_show_groups: print every IOMMU group with its devices, ids and drivers.
tb_show_groups() {
	# shellcheck disable=SC2012 # group names are numbers
	for _tb_g in $(ls /sys/kernel/iommu_groups | sort -n); do
		printf 'TESTBED: group %-3s' "$_tb_g"
		for _tb_d in /sys/kernel/iommu_groups/"$_tb_g"/devices/*; do
			_tb_b=${_tb_d##*/}
			if [ "$(basename "$(readlink "$_tb_d/subsystem")")" = pci ]; then
				printf ' %s[%s:%s %s]' "$_tb_b" "$(cut -c3- "$_tb_d/vendor")" "$(cut -c3- "$_tb_d/device")" "$(tb_driver "$_tb_b")"
			else # an mdev (its subsystem is mdev)
				_tb_drv=none
				[ ! -e "$_tb_d/driver" ] || _tb_drv=$(basename "$(readlink "$_tb_d/driver")")
				printf ' %s[mdev %s]' "$_tb_b" "$_tb_drv"
			fi
		done
		echo
	done
}
