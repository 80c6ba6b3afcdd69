#!/usr/bin/env bash
# testbed/build-tests.sh - build Rust test binaries that run in the testbed
# guest (static, since the guest has no libc) and put them in a share directory.
#
# usage: testbed/build-tests.sh SHARE_DIR [CARGO_TEST_ARGS...]
#   e.g. testbed/build-tests.sh target/testbed-share -p devfence-host --test real_kernel
#
# Runs `cargo test --no-run` with RUSTFLAGS="-C target-feature=+crt-static" and
# an explicit --target (so the flag applies to the test binaries only, not to
# build scripts and proc macros, which cannot be static), from the current
# directory. Then:
#   SHARE_DIR/tests/  the test executables (emptied first); guest/run-tests.sh runs them all
#   SHARE_DIR/bin/    the binary targets cargo built for them (e.g. for integration
#                     tests that run the CLI); in the guest: /mnt/host/bin, on PATH
# A test cannot use env!("CARGO_BIN_EXE_<name>") in the guest: that is a host path.
set -euo pipefail

PROG=testbed/build-tests.sh
[ $# -ge 1 ] || { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
OUT=$1
shift
TARGET=${TESTBED_RUST_TARGET:-x86_64-unknown-linux-gnu}

mkdir -p "$OUT"
rm -rf "${OUT:?}/tests" "${OUT:?}/bin"
mkdir -p "$OUT/tests" "$OUT/bin"
json=$(mktemp)
trap 'rm -f "$json"' EXIT

echo "$PROG: cargo test --no-run --target $TARGET $* (static)" >&2
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
	cargo test --no-run --target "$TARGET" --message-format=json-render-diagnostics "$@" >"$json"

# One JSON object per line; the artifacts with an executable are tests
# ("test":true in their "profile" object; "target" has a "test" key too) or
# binary targets.
profile_test='"profile":\{[^}]*"test":true' 
tests=0 bins=0
while IFS= read -r line; do
	exe=$(sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' <<<"$line")
	[ -n "$exe" ] || continue
	[[ $(LC_ALL=C ldd "$exe" 2>&1) == *"statically linked"* || $(LC_ALL=C ldd "$exe" 2>&1) == *"not a dynamic"* ]] ||
		{ echo "$PROG: error: $exe is not statically linked" >&2
		  echo "$PROG: hint: do not override the target's linking in .cargo/config.toml; check RUSTFLAGS" >&2; exit 1; }
	if [[ $line =~ $profile_test ]]; then
		cp "$exe" "$OUT/tests/" && tests=$((tests + 1))
	else
		cp "$exe" "$OUT/bin/" && bins=$((bins + 1))
	fi
done < <(grep '"reason":"compiler-artifact"' "$json" | grep '"executable":"' || true)

[ "$tests" -gt 0 ] || { echo "$PROG: error: cargo built no test executable for: $*" >&2; exit 1; }
echo "$PROG: $tests test binaries in $OUT/tests, $bins binaries in $OUT/bin" >&2
ls -l "$OUT/tests" "$OUT/bin" >&2
