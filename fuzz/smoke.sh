#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 45) each, starting from the
# checked-in seeds. A crash fails the run and leaves the input in fuzz/artifacts/.
# An input that runs longer than 30 s is a failure too (-timeout): for
# root_containment a hang (a FIFO opened blocking) is the bug it looks for.
set -euo pipefail
cd "$(dirname "$0")"
secs=${FUZZ_SECONDS:-45}
cargo +nightly fuzz build
for t in $(cargo +nightly fuzz list); do
  corpus="corpus/$t"
  mkdir -p "$corpus"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  log="$(mktemp)"
  echo "fuzz $t for ${secs}s"
  if cargo +nightly fuzz run "$t" "$corpus" "${seeds[@]}" -- \
      -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done)' "$log" || tail -n 3 "$log"
  else
    tail -n 60 "$log"
    echo "fuzz target $t failed" >&2
    exit 1
  fi
  rm -f "$log"
done
