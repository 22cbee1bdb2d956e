#!/usr/bin/env bash
# The release binary's size and the instructions per event of outbox-cdc's hot path, for the
# release profile as Cargo.toml has it or changed with cargo's --config (docs/benchmarks.md,
# *Build profiles*):
#   scripts/hot-path-instructions.sh
#   scripts/hot-path-instructions.sh --config 'profile.release.lto="fat"'
# callgrind counts every instruction of benches/hot_path.rs run with OUTBOX_CDC_HOT_PATH_EVENTS
# at N and at 2N events (N = $OUTBOX_CDC_HOT_PATH_EVENTS, 20000 by default); the difference
# divided by N is per event, the set-up cancelled out. Unlike a time, the count does not move
# with the machine's load.
set -euo pipefail
cd "$(dirname "$0")/.."

events=${OUTBOX_CDC_HOT_PATH_EVENTS:-20000}
target=${CARGO_TARGET_DIR:-target}

cargo build --release --locked --bin outbox-cdc "$@"
size=$(stat -c %s "$target/release/outbox-cdc")
bench=$(cargo bench --locked --bench hot_path --no-run --message-format=json "$@" \
  | grep -o '"executable":"[^"]*hot_path[^"]*"' | tail -n 1 | cut -d '"' -f 4)

instructions() {
  OUTBOX_CDC_HOT_PATH_EVENTS=$1 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    "$bench" 2>&1 >/dev/null | sed -n 's/.*Collected : //p'
}
once=$(instructions "$events")
twice=$(instructions $((2 * events)))
[ -n "$once" ] && [ -n "$twice" ] || { echo "callgrind reported no count" >&2; exit 1; }
echo "release binary: $size bytes"
echo "hot path: $(((twice - once) / events)) instructions per event ($once at $events events, $twice at $((2 * events)))"
