#!/usr/bin/env bash
# A/B rounds for the "direct seq read" row, with the disk's view of each run.
#
#   AGENTS="A=/tmp/a-agent B=/tmp/b-agent:SOME_ENV=1 R=raw" bench/seqread-ab.sh
#
# Starts `nbdkit file cache=none` (tag K) and one agent per AGENTS entry
# (TAG=BINARY[:VAR=VALUE...], io_uring, direct_io = "on", standalone) on one
# backing file, then runs fio's sequential read (nbd engine, 1 connection)
# against each in turn, ROUNDS times, the order rotated each round; the page
# cache is dropped before every run (when root). The tag R (any value) is
# fio's own O_DIRECT io_uring read of the backing file: what the disk gives
# at that moment. Per run it prints MiB/s and, from /sys/block/DEV/stat, the
# average read request the disk saw (after merging and splitting), the
# average reads in flight, the disk's busy time and the mean read latency.
#
# Knobs: ROUNDS (4), RT (3 s; 1 s ramp), BS (1M), QD (8), SIZE_MIB (1024;
# the file is written once with dd and kept), DATA (/var/tmp/nbdm-seqread-SIZE.img),
# DEV (the disk under DATA, e.g. vda), MDCTRL_BIN (target/release/mdctrl).
# Note: nbdkit cache=none keeps what it read in the page cache, so with a
# file smaller than what a run reads (RT+1 s at ~2 GB/s) its later passes
# are page-cache reads (bench/HISTORY.md, "Direct seq read round").
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
BENCH_NAME=seqread-ab
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
DROP="$(drop_caches_setting)"
ROUNDS=${ROUNDS:-4}; RT=${RT:-3}; BS=${BS:-1M}; QD=${QD:-8}; SIZE_MIB=${SIZE_MIB:-1024}
DATA=${DATA:-/var/tmp/nbdm-seqread-$SIZE_MIB.img}
MDCTRL_BIN=${MDCTRL_BIN:-$ROOT/target/release/mdctrl}
AGENT_START_TIMEOUT=10
[[ -n "${AGENTS:-}" ]] || { echo "set AGENTS (see the header)" >&2; exit 2; }
[[ -s "$DATA" ]] || dd if=/dev/zero of="$DATA" bs=1M count="$SIZE_MIB" oflag=direct conv=fsync status=none
if [[ -z "${DEV:-}" ]]; then
    src=$(df --output=source "$DATA" | tail -1)
    DEV=$(lsblk -no PKNAME "$src" 2>/dev/null | head -1)
    [[ -n "$DEV" ]] || DEV=$(basename "$src") # a file system on the whole disk
fi
[[ -r /sys/block/$DEV/stat ]] || { echo "cannot find the disk of $DATA (set DEV)" >&2; exit 2; }
W=$(mktemp -d "$(dirname "$DATA")/seqread-ab.XXXXXX")
PIDS=()
stop_all() { stop_pids "${PIDS[@]}"; PIDS=(); }
on_exit_cleanup "$W"
nbdkit -f -U "$W/nbdkit.sock" file "$DATA" cache=none >"$W/nbdkit.log" 2>&1 & PIDS+=($!)
NBDKIT_PID=$!
declare -A URI=([K]="nbd+unix:///?socket=$W/nbdkit.sock")
start_agent() { # tag binary [VAR=VALUE...]
    local tag=$1 bin=$2 d=$W/$1; shift 2; mkdir -p "$d/run" "$d/data"
    standalone_config "$d" ab "$SIZE_MIB" io_uring on "$DATA"
    start_standalone "$tag" "$d" "$bin" "$d/log" "$d/init" "PIDS[${#PIDS[@]}]" RUST_LOG=warn "$@"
    URI[$tag]="nbd+unix:///md1?socket=$d/run/md1.nbd"
}
ORD=(K)
for spec in $AGENTS; do
    tag=${spec%%=*}; IFS=: read -ra parts <<<"${spec#*=}"
    [[ $tag == R ]] || start_agent "$tag" "${parts[@]}"
    ORD+=("$tag")
done
wait_for 5 "$NBDKIT_PID" test -S "$W/nbdkit.sock" || { cat "$W/nbdkit.log" >&2; die "nbdkit did not start"; }
# reads completed, sectors read, ms reading, ms busy, weighted ms in flight
ds() { awk '{print $1, $3, $4, $10, $11}' "/sys/block/$DEV/stat"; }
for r in $(seq "$ROUNDS"); do
    line="round $r:"
    for t in "${ORD[@]}"; do
        drop_caches
        if [[ $t == R ]]; then tgt=(--ioengine=io_uring --direct=1 --filename="$DATA"); else tgt=(--ioengine=nbd --uri="${URI[$t]}"); fi
        read -r n0 s0 t0 u0 q0 < <(ds); w0=$(date +%s.%N)
        fio --name=r "${tgt[@]}" --rw=read --bs="$BS" --iodepth="$QD" --time_based --runtime="$RT" \
            --ramp_time=1 --output-format=json --output="$W/f.json" >/dev/null 2>"$W/fio.err" || { cat "$W/fio.err" >&2; exit 1; }
        read -r n1 s1 t1 u1 q1 < <(ds); w1=$(date +%s.%N)
        line+=$(python3 - "$W/f.json" <<PY
import json, sys
bw = json.load(open(sys.argv[1]))["jobs"][0]["read"]["bw"] / 1024
n = max($n1 - $n0, 1); e = $w1 - $w0
print(" $t=%.0f (%.0fK q%.1f busy %.0f%% %.2fms)" % (bw, ($s1 - $s0) / 2 / n, ($q1 - $q0) / 1000 / e, ($u1 - $u0) / 10 / e, ($t1 - $t0) / n))
PY
)
    done
    echo "$line"
    ORD=("${ORD[@]:1}" "${ORD[0]}")
done
