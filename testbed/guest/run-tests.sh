#!/bin/sh
# testbed/guest/run-tests.sh - the guest script CI runs (busybox sh, as root):
#
#   testbed/run.sh -k 6.1 -s SHARE testbed/guest/run-tests.sh
#
# Loads the drivers the tests use, prints the IOMMU groups, then runs every
# executable file in /mnt/host/tests (SHARE/tests on the host: static Rust
# test binaries from `cargo test --no-run`), in name order, each with
# `--test-threads=1 --nocapture`. Exits 0 if all of them pass, 1 otherwise
# (2 if there is no test binary at all, 3 if a driver does not load).
#
# The test binaries see the environment of guest/lib.sh: TESTBED=1,
# TESTBED_KERNEL, TESTBED_SERIES and the topology (TESTBED_IGB_PF, ...), and
# SHARE/bin (from build-tests.sh) as /mnt/host/bin on PATH (TESTBED_BIN_DIR).
# testbed.filter=NAME on the kernel command line (TESTBED_APPEND on the host)
# is passed to every binary as libtest's name filter.
set -u
# shellcheck source=testbed/guest/lib.sh
. /testbed/lib.sh

TESTS=${TESTBED_TESTS:-/mnt/host/tests}
# binaries that testbed/build-tests.sh put beside the tests (e.g. the CLI)
if [ -d /mnt/host/bin ]; then
	PATH=/mnt/host/bin:$PATH TESTBED_BIN_DIR=/mnt/host/bin
	export PATH TESTBED_BIN_DIR
fi

echo "TESTBED: loading drivers"
ok=1
# vfio-pci with enable_sriov=1, so a PF bound to vfio-pci can still create VFs
# (the VF-token tests need that; the parameter is read-only once loaded).
for m in vfio vfio_iommu_type1 "vfio_pci enable_sriov=1" mdev mtty igb igbvf e1000e nvme; do
	# shellcheck disable=SC2086 # "module param=value" is split on purpose
	tb_modprobe $m || ok=0
done
[ $ok = 1 ] || { echo "TESTBED: a driver did not load; not running the tests"; exit 3; }
tb_show_groups

set -- "$TESTS"/*
if [ ! -d "$TESTS" ] || [ ! -e "$1" ]; then
	echo "TESTBED: no test binaries in $TESTS (put them in SHARE_DIR/tests on the host)"
	echo "testbed: 0 passed, 0 failed"
	exit 2
fi

# shellcheck disable=SC3040 # busybox ash has pipefail
set -o pipefail
bins=0 bad=0 passed=0 failed=0 ignored=0 badnames=""
for t in "$TESTS"/*; do
	{ [ -f "$t" ] && [ -x "$t" ]; } || continue
	bins=$((bins + 1))
	name=${t##*/}
	out=/tmp/test-output.$bins
	echo "TESTBED: ==== $name (at $(cut -d' ' -f1 /proc/uptime)s)"
	set -- --test-threads=1 --nocapture
	[ -z "${TESTBED_FILTER:-}" ] || set -- "$@" "$TESTBED_FILTER"
	"$t" "$@" 2>&1 | tee "$out"
	rc=$?
	# libtest's line: "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ..."
	counts=$(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$out")
	# shellcheck disable=SC2086 # three numbers per result line
	set -- $counts
	p=0 f=0 i=0
	while [ $# -ge 3 ]; do p=$((p + $1)) f=$((f + $2)) i=$((i + $3)); shift 3; done
	passed=$((passed + p)) failed=$((failed + f)) ignored=$((ignored + i))
	if [ "$rc" != 0 ]; then
		bad=$((bad + 1)) badnames="$badnames $name"
		# a crash (or a non-libtest binary) that reported no failed test still counts as one
		[ "$f" != 0 ] || failed=$((failed + 1))
		echo "TESTBED: ==== $name FAILED (exit status $rc); last kernel messages:"
		dmesg | tail -n 25
	else
		echo "TESTBED: ==== $name ok ($p passed, $i ignored)"
	fi
done

echo "TESTBED SUMMARY: kernel $TESTBED_KERNEL: $bins test binaries, $bad failed${badnames:+ (}${badnames# }${badnames:+)}; tests: $passed passed, $failed failed, $ignored ignored"
echo "testbed: $passed passed, $failed failed"
[ "$bins" -gt 0 ] || exit 2
[ "$bad" = 0 ]
