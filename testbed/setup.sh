#!/usr/bin/env bash
# testbed/setup.sh - install and cache everything the real-kernel testbed needs.
#
# usage: testbed/setup.sh [-k SERIES]...     (default: every series, i.e. 6.1 and 6.12)
#
# Idempotent: a second run only refreshes apt's lists and checks that the cache
# is up to date (a few seconds). What it does:
#   1. adds the bookworm-backports suite to apt's sources, using the Debian
#      mirror already configured on this machine (unless backports is already
#      configured): /etc/apt/sources.list.d/devfence-testbed-backports.sources;
#   2. apt-get update; installs qemu-system-x86 from bookworm-backports (QEMU >= 8
#      has `-device igb`, an SR-IOV NIC), busybox-static (the guest's userland,
#      also used on the host for depmod and cpio) and the compiler for mtty;
#   3. for each kernel series: asks apt-cache for the current linux-image-amd64
#      of that series (6.1: bookworm / bookworm-security; 6.12: bookworm-backports),
#      downloads that image and the headers, kbuild and source packages of the
#      very same version with `apt-get download` (none of them is installed on
#      the host), unpacks them with `dpkg -x`, generates modules.dep, and builds
#      the vfio-mdev sample driver mtty.ko out of tree against those headers
#      (Debian kernels do not build samples/).
# Everything lands in the cache directory (see common.sh for its layout).
#
# Env: TESTBED_CACHE           cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/devfence-testbed)
#      TESTBED_NO_APT_UPDATE=1 skip `apt-get update` (e.g. re-running offline)
# Runs as root, or as a user with sudo (only the apt steps use sudo).
set -euo pipefail
shopt -s inherit_errexit # a failure inside $(...) is a failure too

PROG=testbed/setup.sh
# One line per action taken, on stderr, saying why ("devfence testbed: installing
# …"). With TESTBED_QUIET=1 (the test harness) the details go to stdout (fd 8),
# which the harness shows only when setup fails; else they go to stderr.
if [ "${TESTBED_QUIET:-0}" = 1 ]; then exec 8>&1; else exec 8>&2; fi
say() { printf 'devfence testbed: %s\n' "$*" >&2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=testbed/common.sh
. "$HERE/common.sh"

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
SERIES=()
while getopts k:h opt; do
	case $opt in
	k) testbed_suites_for "$OPTARG" >/dev/null || tb_die "unknown kernel series '$OPTARG'" "use one of: ${TESTBED_SERIES[*]}"
	   SERIES+=("$OPTARG") ;;
	*) usage ;;
	esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || usage
[ ${#SERIES[@]} -gt 0 ] || SERIES=("${TESTBED_SERIES[@]}")

sub() { printf '  [%6ss] %s\n' "$(tb_elapsed)" "$*" >&8; }
STEP=start
step() { STEP=$*; printf '\n== [%6ss] %s\n' "$(tb_elapsed)" "$*" >&8; }
# Expected failures end in tb_die (a message and a hint). For anything else,
# remember the last failing command (set -E: also inside functions) and
# report it on the way out.
set -E
LAST_ERR=""
trap 'LAST_ERR="line $LINENO: $BASH_COMMAND"' ERR
on_exit() {
	local rc=$?
	[ "$rc" != 0 ] && [ -z "${TB_DIED:-}" ] || return 0
	printf '%s: error: failed in step "%s" (status %s)%s\n' "$PROG" "$STEP" "$rc" "${LAST_ERR:+ at $LAST_ERR}" >&2
	printf '%s: hint: the output above shows why; logs are in %s. setup.sh is idempotent: fix the cause and run it again.\n' \
		"$PROG" "${LOGS:-$TESTBED_CACHE/logs}" >&2
}
trap on_exit EXIT

# --- preconditions -------------------------------------------------------------
# shellcheck source=/dev/null
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
[ "$codename" = "$TESTBED_CODENAME" ] ||
	tb_die "this host is '${codename:-unknown}', the testbed is built for Debian 12 ($TESTBED_CODENAME)" \
		"run it on a Debian 12 machine (the guest kernels and QEMU come from $TESTBED_CODENAME and $TESTBED_BACKPORTS)"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
	command -v sudo >/dev/null || tb_die "the apt steps need root" "run as root, or install sudo"
	SUDO=(sudo)
fi
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0)
mkdir -p "$TESTBED_CACHE/kernels" "$TESTBED_CACHE/logs" ||
	tb_die "cannot create the cache directory $TESTBED_CACHE" "set TESTBED_CACHE to a writable directory"
LOGS=$TESTBED_CACHE/logs
# One setup.sh at a time per cache; run.sh takes the same lock shared.
exec 9<"$TESTBED_CACHE"
if ! flock -n 9; then
	tb_say "another setup.sh or run.sh is using $TESTBED_CACHE; waiting for it"
	flock 9
fi
step "cache: $TESTBED_CACHE"

# --- 1. the backports suite ----------------------------------------------------
OUR_SOURCES=/etc/apt/sources.list.d/devfence-testbed-backports.sources

# Prints "URI<TAB>SIGNED-BY" of the first enabled `deb` source of suite $1,
# from one-line (*.list) and deb822 (*.sources) files.
find_mirror() {
	local suite=$1 f
	shopt -s nullglob
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		awk -v suite="$suite" '
			/^[[:space:]]*(#|$)/ { next }
			$1 == "deb" {
				i = 2; opts = ""
				if ($i ~ /^\[/) { while (i <= NF) { opts = opts " " $i; if ($i ~ /\]$/) break; i++ } i++ }
				if ($(i + 1) == suite) {
					sb = ""
					if (match(opts, /signed-by=[^] ]+/)) sb = substr(opts, RSTART + 10, RLENGTH - 10)
					print $i "\t" sb; exit
				}
			}' "$f"
	done
	for f in /etc/apt/sources.list.d/*.sources; do
		awk -v suite="$suite" '
			BEGIN { RS = ""; FS = "\n" }
			{
				split("", fld); k = ""
				for (i = 1; i <= NF; i++) {
					if ($i ~ /^#/) continue
					if ($i ~ /^[ \t]/) { if (k != "") fld[k] = fld[k] "\n" $i; continue }
					p = index($i, ":"); if (!p) continue
					k = tolower(substr($i, 1, p - 1)); fld[k] = substr($i, p + 1)
				}
				if (tolower(fld["enabled"]) ~ /no/) next
				nt = split(fld["types"], t, " "); deb = 0
				for (j = 1; j <= nt; j++) if (t[j] == "deb") deb = 1
				if (!deb) next
				ns = split(fld["suites"], s, " ")
				for (j = 1; j <= ns; j++) if (s[j] == suite) {
					split(fld["uris"], u, " "); sb = fld["signed-by"]; gsub(/^[ \t]+|[ \t]+$/, "", sb)
					if (sb ~ /\n/) sb = ""      # an inline key block: use the default keyring
					print u[1] "\t" sb; exit
				}
			}' "$f"
	done
}

step "apt sources: $TESTBED_BACKPORTS"
shopt -s nullglob
other_sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
	[ -f "$f" ] && [ "$f" != "$OUR_SOURCES" ] && other_sources+=("$f")
done
shopt -u nullglob
if [ ${#other_sources[@]} -gt 0 ] &&
	grep -Eqs "^[^#]*[[:space:]]$TESTBED_BACKPORTS([[:space:]/]|\$)" "${other_sources[@]}"; then
	echo "  $TESTBED_BACKPORTS is already configured on this machine" >&8
else
	mirror=$(find_mirror "$TESTBED_CODENAME" | sed -n 1p)
	uri=${mirror%%$'\t'*}
	signed_by=${mirror#*$'\t'}
	[ -n "$uri" ] ||
		tb_die "no '$TESTBED_CODENAME' apt source found in /etc/apt/sources.list or /etc/apt/sources.list.d/" \
			"configure the Debian mirror for $TESTBED_CODENAME first (or add $TESTBED_BACKPORTS yourself)"
	if [ -z "$signed_by" ] && [ -f /usr/share/keyrings/debian-archive-keyring.gpg ]; then
		signed_by=/usr/share/keyrings/debian-archive-keyring.gpg
	fi
	want=$(printf '# Added by devfence testbed/setup.sh: QEMU with igb and the 6.12 guest kernel.\nTypes: deb\nURIs: %s\nSuites: %s\nComponents: main\n%s' \
		"$uri" "$TESTBED_BACKPORTS" "${signed_by:+Signed-By: $signed_by
}")
	if [ "$(cat "$OUR_SOURCES" 2>/dev/null)" = "$want" ]; then
		echo "  $OUR_SOURCES is up to date (mirror $uri)" >&8
	else
		echo "  writing $OUR_SOURCES (mirror $uri)" >&8
		say "adding the apt source $TESTBED_BACKPORTS ($OUR_SOURCES): QEMU with the SR-IOV igb NIC and the 6.12 guest kernel come from it …"
		printf '%s\n' "$want" | "${SUDO[@]}" tee "$OUR_SOURCES.tmp" >/dev/null
		"${SUDO[@]}" mv "$OUR_SOURCES.tmp" "$OUR_SOURCES"
	fi
fi

if [ "${TESTBED_NO_APT_UPDATE:-0}" != 1 ]; then
	step "apt-get update"
	say "refreshing apt's package lists (the guest kernels are looked up there; TESTBED_NO_APT_UPDATE=1 skips it) …"
	"${APT[@]}" update >"$LOGS/apt-update.log" 2>&1 ||
		{ tail -n 20 "$LOGS/apt-update.log" >&2; tb_die "apt-get update failed (log: $LOGS/apt-update.log)" \
			"check the machine's network access to its Debian mirror"; }
	grep -E '^(W|E):' "$LOGS/apt-update.log" >&8 || true
fi
# --- 2. host packages ------------------------------------------------------------
installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
qemu_has_igb() { command -v qemu-system-x86_64 >/dev/null && [[ $(qemu-system-x86_64 -device help 2>/dev/null) == *'"igb"'* ]]; }

step "host packages"
if qemu_has_igb; then
	echo "  QEMU with igb is installed" >&8
else
	echo "  installing qemu-system-x86 from $TESTBED_BACKPORTS" >&8
	say "installing qemu-system-x86 from $TESTBED_BACKPORTS (needed by the real-kernel tests: QEMU >= 8 has the SR-IOV igb NIC) …"
	"${APT[@]}" install --no-install-recommends -t "$TESTBED_BACKPORTS" qemu-system-x86 >"$LOGS/apt-install-qemu.log" 2>&1 ||
		{ tail -n 20 "$LOGS/apt-install-qemu.log" >&2; tb_die "installing qemu-system-x86 from $TESTBED_BACKPORTS failed (log: $LOGS/apt-install-qemu.log)" \
			"try by hand: apt-get install -t $TESTBED_BACKPORTS qemu-system-x86"; }
	qemu_has_igb || tb_die "the installed qemu-system-x86_64 has no igb device" \
		"QEMU >= 8.0 is needed; check 'apt-cache policy qemu-system-x86'"
fi
# busybox-static: guest userland and host-side depmod/cpio; the rest builds mtty.ko
# (the kbuild tools link libelf, libssl and zlib) and unpacks kernel modules;
# pciutils: lspci, the reference the inventory is checked and benchmarked against.
host_pkgs=(busybox-static make gcc-12 xz-utils zstd gzip binutils libelf1 libssl3 zlib1g pciutils)
missing=()
for p in "${host_pkgs[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
	echo "  installing ${missing[*]}" >&8
	say "installing ${missing[*]} (the guest's busybox userland and the compiler for the mtty mdev driver) …"
	"${APT[@]}" install --no-install-recommends "${missing[@]}" >"$LOGS/apt-install.log" 2>&1 ||
		{ tail -n 20 "$LOGS/apt-install.log" >&2; tb_die "installing ${missing[*]} failed (log: $LOGS/apt-install.log)"; }
else
	echo "  ${host_pkgs[*]}: installed" >&8
fi
BUSYBOX=$(command -v busybox) || tb_die "busybox not found after installing busybox-static"
echo "  $(qemu-system-x86_64 --version | sed -n 1p)" >&8

# --- 3. guest kernels and mtty -------------------------------------------------------

# Prints the highest version in `apt-cache madison` output (stdin) that comes
# from one of the suites $1 ("a b c").
highest_in_suites() {
	local suites=" $1 " best="" v suite
	while read -r v suite; do
		[[ $suites == *" $suite "* ]] || continue
		if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
	done < <(awk -F'|' '{ gsub(/ /, "", $2); split($3, a, " "); split(a[2], b, "/"); print $2, b[1] }')
	echo "$best"
}
# Prints VERSION if apt has PKG=VERSION, else the highest version apt has (with a warning).
version_or_best() {
	local pkg=$1 want=$2 best="" v
	while read -r v; do
		[ "$v" = "$want" ] && { echo "$want"; return; }
		if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
	done < <(apt-cache madison "$pkg" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }')
	[ -n "$best" ] || tb_die "apt has no package $pkg" "run 'apt-get update'; check that $TESTBED_BACKPORTS is configured"
	tb_say "warning: $pkg=$want is not available, using $pkg=$best"
	echo "$best"
}
# Reads `apt-cache show PKG=VER` on stdin; prints the names in its Depends
# that match the extended regex $1.
depends_matching() {
	sed -n 's/^Depends: //p' | sed -n 1p | tr ',|' '\n' | awk '{ print $1 }' | grep -E "$1" || true
}

# Prints a field (e.g. depends, softdep) of a kernel module's .modinfo section.
modinfo_field() {
	local ko=$1 field=$2 sec
	sec=$(mktemp)
	objcopy -O binary -j .modinfo "$ko" "$sec"
	tr '\0' '\n' <"$sec" | sed -n "s/^$field=//p"
	rm -f "$sec"
}

# mod_listed FILE NAME: is module NAME (- and _ alike) in modules.order/modules.builtin FILE?
# With -p, prints its path.
mod_listed() {
	local print=0
	[ "$1" != -p ] || { print=1; shift; }
	awk -v n="${2//-/_}" -v p="$print" '
		{ b = $0; sub(/.*\//, "", b); sub(/\.ko$/, "", b); gsub(/-/, "_", b)
		  if (b == n) { if (p) print; f = 1; exit } }
		END { exit !f }' "$1"
}

# copy_modules SRC_MODDIR DST_MODDIR NAME...: copies the modules NAME... and
# everything they depend on (modinfo depends= and softdep=) from an unpacked
# kernel's module directory, decompressed, keeping their relative paths.
# Prints the names copied. Unknown names are an error unless built in.
copy_modules() {
	local src=$1 dst=$2 n rel f ko dep
	shift 2
	local -a todo=("$@") hard
	local -A seen=()
	while [ ${#todo[@]} -gt 0 ]; do
		n=${todo[0]//-/_}
		todo=("${todo[@]:1}")
		[ -z "${seen[$n]:-}" ] || continue
		if ! rel=$(mod_listed -p "$src/modules.order" "$n"); then
			mod_listed "$src/modules.builtin" "$n" && continue
			tb_die "kernel module $n is neither in $src/modules.order nor built in" \
				"check the module names in TESTBED_MODULES (testbed/common.sh)"
		fi
		seen[$n]=1
		ko=$dst/$rel
		mkdir -p "$(dirname "$ko")"
		if [ -f "$src/$rel" ]; then cp "$src/$rel" "$ko"
		elif [ -f "$src/$rel.xz" ]; then xz -dc "$src/$rel.xz" >"$ko"
		elif [ -f "$src/$rel.zst" ]; then zstd -dcq "$src/$rel.zst" >"$ko"
		else tb_die "module file $src/$rel(.xz|.zst) is missing"
		fi
		f=$(modinfo_field "$ko" name)
		[ "$f" = "$n" ] || tb_die "cannot read the .modinfo section of $ko (name '$f')" "objcopy (binutils) must work"
		read -ra hard <<<"$(modinfo_field "$ko" depends | tr ',' ' ')"
		todo+=("${hard[@]}")
		# soft dependencies ("pre: a b post: c") may name modules this kernel lacks
		for dep in $(modinfo_field "$ko" softdep); do
			case $dep in pre: | post:) continue ;; esac
			! mod_listed "$src/modules.order" "$dep" || todo+=("$dep")
		done
	done
	for f in modules.order modules.builtin modules.builtin.modinfo; do
		[ ! -f "$src/$f" ] || cp "$src/$f" "$dst/"
	done
	printf '%s\n' "${!seen[@]}" | sort | tr '\n' ' '
}

# build_mtty HEADERS_ROOT KVER MTTY_C OUT_KO LOG
# HEADERS_ROOT holds linux-headers-KVER, its -common and linux-kbuild unpacked
# with dpkg -x. The headers' Makefile includes the -common tree by its absolute
# /usr/src path: point it at the unpacked copy instead.
build_mtty() {
	local root=$1 kver=$2 src=$3 out=$4 log=$5 h m vermagic
	h=$root/usr/src/linux-headers-$kver
	[ -f "$h/Makefile" ] || tb_die "no $h/Makefile in the headers package"
	sed -i "s#/usr/src/#$root/usr/src/#g" "$h/Makefile"
	m=$root/mtty-build
	mkdir -p "$m" && cp "$src" "$m/mtty.c" && echo 'obj-m := mtty.o' >"$m/Kbuild"
	# No pahole here, so no BTF for the module (CONFIG_DEBUG_INFO_BTF_MODULES=).
	make -C "$h" M="$m" CONFIG_DEBUG_INFO_BTF_MODULES= modules >"$log" 2>&1 ||
		{ tail -n 30 "$log" >&2; tb_die "building mtty.ko for $kver failed (log: $log)" \
			"the kbuild tools need gcc-12, make, libelf1, libssl3; see the log"; }
	vermagic=$(modinfo_field "$m/mtty.ko" vermagic)
	[ -n "$vermagic" ] || tb_die "cannot read the vermagic of $m/mtty.ko" "objcopy (binutils) must work"
	[ "${vermagic%% *}" = "$kver" ] ||
		tb_die "mtty.ko was built for '${vermagic%% *}', not $kver" "the headers do not match the kernel image"
	mkdir -p "$(dirname "$out")" && cp "$m/mtty.ko" "$out"
}

# extract_vmlinux BZIMAGE OUT: the uncompressed ELF kernel inside a bzImage
# (like the kernel's scripts/extract-vmlinux). QEMU boots it through PVH,
# which skips the in-guest decompression (about 3 s of TCG time for xz).
extract_vmlinux() {
	local bz=$1 out=$2 fmt magic off
	local -a cmd
	for fmt in xz zstd gzip; do
		case $fmt in
		xz) cmd=(xz -dcq) magic='\xfd7zXZ\x00' ;;
		zstd) cmd=(zstd -dcq) magic='\x28\xb5\x2f\xfd' ;;
		gzip) cmd=(gzip -dcq) magic='\x1f\x8b\x08' ;;
		esac
		# every place the format's magic occurs (LC_ALL=C: match bytes, not UTF-8)
		# shellcheck disable=SC2013 # the offsets are numbers
		for off in $(LC_ALL=C grep -aobUP "$magic" "$bz" | cut -d: -f1); do
			# data after the compressed stream makes the decompressor fail: ignore that
			tail -c +$((off + 1)) "$bz" | "${cmd[@]}" >"$out" 2>/dev/null || true
			[ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' ')" != 7f454c46 ] || return 0
		done
	done
	rm -f "$out"
	return 1
}

setup_series() {
	local series=$1 suites ver img kver kdir hdr show common kbuild kbuild_ver src_ver work tmp p mods
	local -a specs modarr
	suites=$(testbed_suites_for "$series")
	step "kernel $series (from: $suites)"
	ver=$(highest_in_suites "$suites" <<<"$META_MADISON" | grep "^$series\." || true)
	[ -n "$ver" ] || tb_die "apt has no linux-image-amd64 $series.* in $suites" \
		"run 'apt-get update'; check that $suites are configured ('apt-cache policy', 'apt-cache madison linux-image-amd64')"
	# the Depends of that version of the metapackage names the image package
	img=$(awk -v v="$ver" 'BEGIN { RS = ""; FS = "\n" } { for (i = 1; i <= NF; i++) if ($i == "Version: " v) { print; exit } }' <<<"$META_SHOW" |
		depends_matching '^linux-image-' | sed -n 1p)
	[ -n "$img" ] || tb_die "cannot resolve linux-image-amd64=$ver to an image package"
	kver=${img#linux-image-}
	kdir=$TESTBED_CACHE/kernels/$kver
	sub "linux-image-amd64=$ver -> $img (kernel $kver)"
	mods=$(echo "$TESTBED_MODULES" | tr -s ' \n' ' ')
	if grep -qsx "$img=$ver" "$kdir/testbed-versions.txt" && grep -qsxF "$mods" "$kdir/testbed-modules.txt" &&
		[ -f "$kdir/vmlinuz" ] && [ -f "$kdir/root/lib/modules/$kver/modules.dep" ]; then
		sub "cached: $kdir"
		[ -f "$kdir/vmlinux" ] || ! extract_vmlinux "$kdir/vmlinuz" "$kdir/vmlinux" || sub "extracted vmlinux for PVH boot"
		ln -sfn "kernels/$kver" "$TESTBED_CACHE/kernel-$series"
		return
	fi
	say "downloading the Debian kernel $kver with its headers and building mtty.ko for it (the $series guest of the real-kernel tests; about 200 MB) …"
	hdr=linux-headers-$kver
	show=$(apt-cache show "$hdr=$ver" 2>/dev/null) || tb_die "apt has no $hdr=$ver (needed to build mtty.ko)"
	common=$(depends_matching '^linux-headers-.*-common$' <<<"$show" | sed -n 1p)
	kbuild=$(depends_matching '^linux-kbuild-' <<<"$show" | sed -n 1p)
	{ [ -n "$common" ] && [ -n "$kbuild" ]; } || tb_die "cannot find the -common and kbuild packages of $hdr=$ver"
	kbuild_ver=$(version_or_best "$kbuild" "$ver")
	# mtty.c comes from linux-source-<series>; take the same version as the image.
	src_ver=$(version_or_best "linux-source-$series" "$ver")
	specs=("$img=$ver" "$hdr=$ver" "$common=$ver" "$kbuild=$kbuild_ver" "linux-source-$series=$src_ver")

	work=$TESTBED_CACHE/work-$kver
	tmp=$TESTBED_CACHE/kernels/.$kver.tmp
	rm -rf "$work" "$tmp"
	mkdir -p "$work/debs" "$tmp/root/lib/modules/$kver"
	apt-cache show "${specs[@]}" 2>/dev/null |
		awk '/^Package:/ { p = $2 } /^Version:/ { v = $2 } /^Size:/ { printf "download %s=%s (%d MiB)\n", p, v, $2 / 1048576 }' |
		while read -r line; do sub "$line"; done
	(cd "$work/debs" && apt-get download -q "${specs[@]}") >"$LOGS/download-$kver.log" 2>&1 ||
		{ tail -n 20 "$LOGS/download-$kver.log" >&2; tb_die "apt-get download failed (log: $LOGS/download-$kver.log)" \
			"run 'apt-get update' (the versions may have been superseded) and retry"; }

	sub "unpack $img"
	dpkg -x "$work/debs/${img}_"*.deb "$work/image"
	[ -f "$work/image/boot/vmlinuz-$kver" ] || tb_die "no boot/vmlinuz-$kver in $img"
	cp "$work/image/boot/vmlinuz-$kver" "$tmp/vmlinuz"
	cp "$work/image/boot/config-$kver" "$tmp/config"
	if extract_vmlinux "$tmp/vmlinuz" "$tmp/vmlinux"; then
		sub "extracted the uncompressed kernel (vmlinux, $(($(stat -c %s "$tmp/vmlinux") / 1048576)) MiB) for PVH boot"
	else
		sub "warning: could not extract vmlinux from vmlinuz; run.sh will boot the bzImage"
	fi
	sub "select modules: $mods"
	read -ra modarr <<<"$mods"
	p=$(copy_modules "$work/image/lib/modules/$kver" "$tmp/root/lib/modules/$kver" "${modarr[@]}")
	sub "  with dependencies: $p"

	sub "unpack headers, kbuild; extract samples/vfio-mdev/mtty.c from linux-source-$series"
	for p in "$hdr" "$common" "$kbuild"; do dpkg -x "$work/debs/${p}_"*.deb "$work/hdr"; done
	mkdir -p "$work/src"
	dpkg-deb --fsys-tarfile "$work/debs/linux-source-${series}_"*.deb |
		tar -xOf - "./usr/src/linux-source-$series.tar.xz" | xz -dc |
		tar -xf - -C "$work/src" --wildcards '*/samples/vfio-mdev/mtty.c'
	p=$(find "$work/src" -name mtty.c | sed -n 1p)
	[ -n "$p" ] || tb_die "linux-source-$series=$src_ver has no samples/vfio-mdev/mtty.c"

	sub "build mtty.ko against $hdr"
	build_mtty "$work/hdr" "$kver" "$p" "$tmp/root/lib/modules/$kver/extra/mtty.ko" "$LOGS/mtty-$kver.log"
	# modules.dep for the selected modules and mtty (busybox modprobe reads it)
	"$BUSYBOX" depmod -b "$tmp/root" "$kver"
	printf '%s\n' "${specs[@]}" "$(dpkg-query -W -f='${Package}=${Version}' qemu-system-x86)" >"$tmp/testbed-versions.txt"
	echo "$mods" >"$tmp/testbed-modules.txt"
	rm -rf "$kdir" && mv "$tmp" "$kdir"
	rm -rf "$work"
	sub "ready: $kdir ($(du -sh "$kdir" | cut -f1))"
	ln -sfn "kernels/$kver" "$TESTBED_CACHE/kernel-$series"
}

# apt-cache reads all package lists on every call (seconds each, when apt's
# pkgcache is disabled, as on this machine image): ask about the metapackage once.
META_MADISON=$(apt-cache madison linux-image-amd64 2>/dev/null || true)
META_SHOW=$(apt-cache show linux-image-amd64 2>/dev/null || true)
for s in "${SERIES[@]}"; do setup_series "$s"; done

# Drop kernels that no kernel-* link points to any more (older Debian versions).
shopt -s nullglob
for d in "$TESTBED_CACHE"/kernels/*/; do
	d=${d%/}
	keep=0
	for s in "${TESTBED_SERIES[@]}"; do
		if [ "$(readlink -f "$TESTBED_CACHE/kernel-$s" 2>/dev/null)" = "$(readlink -f "$d")" ]; then keep=1; fi
	done
	if [ $keep = 0 ]; then echo "  removing outdated $d" >&8; rm -rf "$d"; fi
done

step "done"
for s in "${TESTBED_SERIES[@]}"; do
	if [ -e "$TESTBED_CACHE/kernel-$s" ]; then
		printf '  kernel %-5s %s\n' "$s" "$(sed -n 1p "$TESTBED_CACHE/kernel-$s/testbed-versions.txt")" >&8
	fi
done
echo "  cache size: $(du -sh "$TESTBED_CACHE" | cut -f1); run a guest script with: testbed/run.sh -k 6.1 SCRIPT" >&8
