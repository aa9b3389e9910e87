#!/usr/bin/env bash
# The single-ring reference pair (bench/ringpair, a measurement, not part of nbd-mirror):
# what the mirrored targets of bench/mirror.sh cost *any* implementation on this box.
# The same fio jobs and client as mirror.sh against `ringpair active` alone (standalone)
# and against `ringpair active` + `ringpair standby` (pair: every write acknowledged once
# on the local disk and received and written by the standby), in alternating order.
# One thread and one io_uring per node, no CRC, no bitmap, no second ack; see the doc
# comment of bench/ringpair/src/main.rs and "Single-ring reference pair" in
# bench/HISTORY.md.
#
#   cargo build --release -p ringpair     # the script does not build
#   bench/ringpair.sh                     # ~2 minutes
#
# Environment (all optional): RUNTIME / RAMP (seconds per fio job, default 3 / 1), REPS
# (runs per job and side, default 3), ONLY_JOBS (from: randwrite lat1 seqwrite; default
# all), BENCH_DIR (the active's file, default /var/tmp), PEER_DIR (the standby's file,
# default /dev/shm), SIZE_MIB (1024), RINGPAIR_BIN (default target/release/ringpair),
# OUT (keep fio JSON and logs), DROP_CACHES=0.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
RUNTIME="${RUNTIME:-3}"; RAMP="${RAMP:-1}"; REPS="${REPS:-3}"
ONLY_JOBS="${ONLY_JOBS:-randwrite lat1 seqwrite}"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
PEER_DIR="${PEER_DIR:-/dev/shm}"
SIZE_MIB="${SIZE_MIB:-1024}"
BIN="${RINGPAIR_BIN:-$ROOT/target/release/ringpair}"

BENCH_NAME=ringpair-bench
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
require_tools fio python3
[[ -x "$BIN" ]] || die "no $BIN: build it with cargo build --release -p ringpair"
DROP="$(drop_caches_setting)"

WORK="$(mktemp -d "$BENCH_DIR/nbd-mirror-ringpair.XXXXXX")"
PEERW="$(mktemp -d "$PEER_DIR/nbd-mirror-ringpair.XXXXXX")"
RES="$WORK/results"; mkdir -p "$RES"
cp "$BIN" "$WORK/ringpair"; BIN="$WORK/ringpair"
ACTIVE_PID=""; STANDBY_PID=""
stop_all() {
    stop_pids $ACTIVE_PID $STANDBY_PID
    ACTIVE_PID=""; STANDBY_PID=""
}
on_exit_cleanup "$WORK" "$PEERW"

log "writing the data files ($SIZE_MIB MiB each: $WORK, $PEERW)"
dd if=/dev/zero of="$WORK/active.img" bs=1M count="$SIZE_MIB" status=none
dd if=/dev/zero of="$PEERW/standby.img" bs=1M count="$SIZE_MIB" status=none
SOCK="$WORK/nbd.sock"
TCK="$(getconf CLK_TCK)"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

start_side() { # standalone|pair
    local port=""
    rm -f "$WORK/active.log"
    if [[ "$1" == pair ]]; then
        port="$(free_ports 1)"
        "$BIN" standby "127.0.0.1:$port" "$PEERW/standby.img" 2>"$WORK/standby.log" &
        STANDBY_PID=$!
        wait_for 10 "$STANDBY_PID" grep -q ready "$WORK/standby.log" || die "standby did not start: $(cat "$WORK/standby.log")"
        "$BIN" active "$SOCK" "$WORK/active.img" "127.0.0.1:$port" 2>"$WORK/active.log" &
    else
        "$BIN" active "$SOCK" "$WORK/active.img" 2>"$WORK/active.log" &
    fi
    ACTIVE_PID=$!
    wait_for 10 "$ACTIVE_PID" grep -q ready "$WORK/active.log" || die "active did not start: $(cat "$WORK/active.log")"
}

run_job() { # side name rw bs qd rep
    local side="$1" name="$2" rw="$3" bs="$4" qd="$5" rep="$6" extra=() f a0 s0=0
    f="$RES/$side.$name.$rep"
    [[ "$name" == lat1 ]] && extra=(--lat_percentiles=1 --percentile_list=50:99)
    drop_caches
    start_side "$side"
    a0="$(cpu_ticks "$ACTIVE_PID")"
    [[ -n "$STANDBY_PID" ]] && s0="$(cpu_ticks "$STANDBY_PID")"
    fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --randrepeat=1 "${extra[@]}" --output-format=json --output="$f.json" >"$f.fio.log" 2>&1 \
        || { cat "$f.fio.log" "$WORK/active.log" >&2; die "fio $name against $side failed"; }
    # Both sides' CPU over the whole job (ramp included) and the writes the active
    # counted over the same time (its log line for the job's connection).
    wait_for 5 "$ACTIVE_PID" grep -qE "active: [1-9][0-9]* writes in" "$WORK/active.log" || true
    echo "$(( $(cpu_ticks "$ACTIVE_PID") - a0 )) $( [[ -n "$STANDBY_PID" ]] && echo $(( $(cpu_ticks "$STANDBY_PID") - s0 )) || echo 0 ) $TCK" >"$f.cpu"
    grep "writes in" "$WORK/active.log" | tail -1 >"$f.writes"
    stop_all
}

ALL_JOBS=("randwrite randwrite 4k 32" "lat1 randwrite 4k 1" "seqwrite write 1M 8")
for j in "${ALL_JOBS[@]}"; do
    read -r name rw bs qd <<<"$j"
    [[ " $ONLY_JOBS " == *" $name "* ]] || continue
    for rep in $(seq 1 "$REPS"); do
        if ((rep % 2)); then order=(standalone pair); else order=(pair standalone); fi
        for side in "${order[@]}"; do
            log "$name run $rep: $side"
            run_job "$side" "$name" "$rw" "$bs" "$qd" "$rep"
        done
    done
done

# Is the pair really mirroring? Fresh zeroed files, one pair run, then compare.
log "check: a pair run on fresh files leaves the standby's file identical to the active's"
dd if=/dev/zero of="$WORK/active.img" bs=1M count="$SIZE_MIB" status=none
dd if=/dev/zero of="$PEERW/standby.img" bs=1M count="$SIZE_MIB" status=none
RUNTIME=1 RAMP=0 run_job pair check randwrite 4k 32 1
if cmp -s "$WORK/active.img" "$PEERW/standby.img"; then SAME=yes; else SAME=NO; fi

python3 - "$RES" "$REPS" "$ONLY_JOBS" "$SAME" <<'PY'
import json, os, sys
res, reps, only, same = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
rows = [("randwrite", "rand write 4 KiB QD32", "iops"), ("lat1", "QD1 write 4 KiB", "lat"),
        ("seqwrite", "seq write 1 MiB QD8", "bw")]
def load(side, name, rep):
    j = json.load(open(f"{res}/{side}.{name}.{rep}.json"))["jobs"][0]["write"]
    a, s, tck = map(int, open(f"{res}/{side}.{name}.{rep}.cpu").read().split())
    line = open(f"{res}/{side}.{name}.{rep}.writes").read().split()
    writes = int(line[2]) if len(line) > 2 else 0
    pct = j.get("lat_ns", {}).get("percentile", {})
    return {"iops": j["iops"], "bw": j["bw_bytes"] / 2**20, "p50": pct.get("50.000000", 0) / 1e3,
            "p99": pct.get("99.000000", 0) / 1e3,
            "a_us": a / tck * 1e6 / max(writes, 1), "s_us": s / tck * 1e6 / max(writes, 1)}
def mean(xs): return sum(xs) / len(xs)
print(f"Single-ring reference pair ({reps} runs per job and side, alternating; "
      f"standby's file identical to the active's after a pair run: {same})\n")
print("| job | standalone | pair | pair / standalone | CPU per write, standalone | CPU per write, pair (active + standby) |")
print("|---|---:|---:|---:|---:|---:|")
for name, label, kind in rows:
    if name not in only:
        continue
    st = [load("standalone", name, r) for r in range(1, reps + 1)]
    pa = [load("pair", name, r) for r in range(1, reps + 1)]
    cpu_st = f"{mean([x['a_us'] for x in st]):.1f} µs"
    cpu_pa = f"{mean([x['a_us'] for x in pa]):.1f} + {mean([x['s_us'] for x in pa]):.1f} µs"
    if kind == "lat":
        for p in ("p50", "p99"):
            a, b = mean([x[p] for x in st]), mean([x[p] for x in pa])
            print(f"| {label} {p} | {a:.1f} µs | {b:.1f} µs | {b / a:.2f}x | {cpu_st} | {cpu_pa} |")
    else:
        unit = "IOPS" if kind == "iops" else "MiB/s"
        a, b = mean([x[kind] for x in st]), mean([x[kind] for x in pa])
        runs = ", ".join(f"{x[kind]:.0f}" for x in st) + " / " + ", ".join(f"{x[kind]:.0f}" for x in pa)
        print(f"| {label} | {a:.0f} {unit} | {b:.0f} {unit} | {b / a:.2f}x | {cpu_st} | {cpu_pa} |")
print("\nRuns (standalone / pair): " + "; ".join(
    f"{label}: " + ", ".join(f"{load('standalone', n, r)[k if k != 'lat' else 'p50']:.0f}" for r in range(1, reps + 1))
    + " / " + ", ".join(f"{load('pair', n, r)[k if k != 'lat' else 'p50']:.0f}" for r in range(1, reps + 1))
    for n, label, k in rows if n in only))
PY
machine_line
