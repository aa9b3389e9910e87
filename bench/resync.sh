#!/usr/bin/env bash
# nbd-mirror resync benchmark (issue 5): in the same run, on the same machine
# and file system,
#   1. a plain `cp` of a SIZE_MIB random file + fsync   (the reference)
#   2. full resyncs of the same data between two agents on loopback
#      (initial mirror construction: two new nodes, server1 activated, R6;
#      then again with server2's disk replaced, R6), median of REPS
#   3. a differential resync after 1% of the regions were written while the
#      mirror was broken (`mdctrl break`, fio writes 4 KiB in every 100th
#      region, `mdctrl recover`)
# and prints a markdown table: full resync throughput / cp throughput (target
# >= 0.8x) and differential time / full time (target <= 3%). Every resync is
# checked byte for byte (cmp) afterwards. See the "Resync" section of
# bench/README.md for the method and the latest results.
#
#   bench/resync.sh                 default run (1 GiB, ~1-2 minutes)
#   SIZE_MIB=256 bench/resync.sh    quicker
#
# Environment (all optional):
#   SIZE_MIB=N        volume size in MiB (default 1024)
#   REPS=N            runs of the full resync, of the differential resync,
#                     and of cp before and again after the resyncs (default 3)
#   BENCH_DIR=DIR     where both nodes' data and the cp copy go (default /var/tmp)
#   REGION_KIB=N      region_size in KiB (default 64, the agent's default)
#   DIRTY_EVERY=N     one 4 KiB write in every N-th region (default 100 = 1%)
#   DIRECT_IO=auto|off  the agents' direct_io (default auto)
#   RESYNC_RATE=SZ    resync_rate (default 0 = unlimited)
#   AGENT_BIN, MDCTRL_BIN  binaries (default target/release/{mirror-agent,mdctrl})
#   OUT=DIR           keep the logs, status samples and the table
#   DROP_CACHES=0     do not drop the page cache before each measurement
#                     (default: drop it when root)
#
# Nothing is installed: missing tools are reported with the apt-get command.
# Every process started here is stopped, and the temp dir removed, on exit.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

SIZE_MIB="${SIZE_MIB:-1024}"
REPS="${REPS:-3}"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
REGION_KIB="${REGION_KIB:-64}"
DIRTY_EVERY="${DIRTY_EVERY:-100}"
DIRECT_IO="${DIRECT_IO:-auto}"
RESYNC_RATE="${RESYNC_RATE:-0}"
AGENT_BIN="${AGENT_BIN:-$ROOT/target/release/mirror-agent}"
MDCTRL_BIN="${MDCTRL_BIN:-$ROOT/target/release/mdctrl}"

BENCH_NAME=resync-bench
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# --- prerequisites (checked, never installed) --------------------------------
require_tools fio python3 cmp:diffutils
for v in SIZE_MIB REPS REGION_KIB DIRTY_EVERY; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
case "$DIRECT_IO" in auto|off) ;; *) die "DIRECT_IO must be auto or off" ;; esac

DROP="$(drop_caches_setting)"

# --- temp dir and cleanup --------------------------------------------------------
WORK="$(mktemp -d "$BENCH_DIR/nbd-mirror-rbench.XXXXXX")"
RES="$WORK/results"
mkdir -p "$RES" "$WORK/run" "$WORK/data"
PIDS=()

stop_all() {
    stop_pids "${PIDS[@]}"
    PIDS=()
}

on_exit_cleanup "$WORK"

now() { date +%s.%N; }

private_binaries

FSTYPE="$(df --output=fstype "$WORK" | tail -1 | tr -d ' ')"
[[ "$FSTYPE" == tmpfs ]] && log "WARNING: BENCH_DIR $BENCH_DIR is tmpfs: the numbers will not reflect a disk"
SRC="$WORK/data/server1.img"
DST="$WORK/data/server2.img"
BYTES=$((SIZE_MIB << 20))
log "writing ${SIZE_MIB} MiB of random data to $SRC ($FSTYPE)"
dd if=/dev/urandom of="$SRC" bs=1M count="$SIZE_MIB" iflag=fullblock conv=fsync status=none

# --- 1. the reference: cp + fsync of the same data on the same file system ------
# Fair to the resync: the page cache is dropped before each run (when root),
# so cp reads SRC from the disk as the source agent does (O_DIRECT or cold
# cache); the destination is a new file on the same file system (the
# standby's data file is a new sparse file: both allocate as they write); cp
# pays one fsync of the destination, the resync a flush per committed batch
# (its durability rule), both before the time is taken. The runs are
# interleaved with the full resyncs (one right before each, so the disk's
# drift over the run hits both alike) and REPS more follow the resyncs; the
# median of all is the reference, and each full resync is also compared with
# the cp run just before it (the pairwise ratios).
CP_TIMES=()
# Dropping the page cache also drops the tools' own binaries; each timed
# run first executes its tool once (outside the clock) so that the data is
# read cold, not the program (mdctrl is a large binary: ~15 ms to page in).
warm_tools() {
    cp --version >/dev/null
    sync --version >/dev/null
    if [[ -n "${CONF:-}" && -S "$WORK/run/server1.sock" ]]; then
        "$MDCTRL_BIN" --config "$CONF" --node server1 status md1 >/dev/null 2>&1 || true
    fi
}
cp_runs() { # label count
    local r t0 t1
    for r in $(seq "$2"); do
        rm -f "$WORK/data/cp.img"
        drop_caches
        warm_tools
        t0="$(now)"
        cp --sparse=never "$SRC" "$WORK/data/cp.img"
        sync "$WORK/data/cp.img"
        t1="$(now)"
        CP_TIMES+=("$(python3 -c "print(f'{$t1-$t0:.3f}')")")
        log "cp run ($1): ${CP_TIMES[-1]} s"
    done
    rm -f "$WORK/data/cp.img"
}
# A second reference, for reading the table: the same copy with O_DIRECT,
# 4 MiB at a time (what the agents' default direct_io gets from this disk
# without the page cache), into a sparse file like the standby's.
drop_caches
truncate -s "${SIZE_MIB}M" "$WORK/data/dd.img"
t0="$(now)"
dd if="$SRC" of="$WORK/data/dd.img" bs=4M iflag=direct oflag=direct conv=notrunc,fsync status=none
t1="$(now)"
DD_TIME="$(python3 -c "print(f'{$t1-$t0:.3f}')")"
rm -f "$WORK/data/dd.img"
log "dd O_DIRECT: $DD_TIME s"

# --- 2. the pair: two new nodes, auto_recovery off so that `recover` starts each
# measured resync ---------------------------------------------------------------------
read -r -a ports <<<"$(free_ports 4)"
CONF="$WORK/cluster.toml"
{
    echo "[cluster]"
    echo "name = \"rbench\""
    echo "secret_file = \"$WORK/secret\""
    for i in 1 2; do
        echo
        echo "[[server]]"
        echo "name = \"server$i\""
        echo "address = \"127.0.0.1\""
        echo "control_port = ${ports[$((i - 1))]}"
        echo "admin_socket = \"$WORK/run/server$i.sock\""
    done
    echo
    echo "[[resource]]"
    echo "name = \"md1\""
    echo "size = \"${SIZE_MIB}MiB\""
    echo "mode = \"sync\""
    echo "region_size = \"${REGION_KIB}KiB\""
    echo "direct_io = \"$DIRECT_IO\""
    echo "auto_recovery = false"
    echo "resync_rate = \"$RESYNC_RATE\""
    for i in 1 2; do
        echo
        echo "[resource.server.server$i]"
        echo "data_path = \"$WORK/data/server$i.img\""
        echo "cluster_partition = \"$WORK/data/server$i.cp\""
        echo "divergent_save_dir = \"$WORK/divergent-server$i\""
        echo "mirror_port = ${ports[$((i + 1))]}"
        echo "nbd_socket = \"$WORK/run/server$i-md1.nbd\""
    done
} >"$CONF"
(umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$WORK/secret"; echo >>"$WORK/secret")
truncate -s "${SIZE_MIB}M" "$DST"
ctl() { local n="$1"; shift; "$MDCTRL_BIN" --config "$CONF" --node "$n" "$@"; }
for n in server1 server2; do
    ctl "$n" init md1 >>"$RES/init.log" 2>&1 || { cat "$RES/init.log" >&2; die "mdctrl init ($n) failed"; }
done
for n in server1 server2; do
    RUST_LOG="${RUST_LOG:-info}" "$AGENT_BIN" --config "$CONF" --node "$n" >"$RES/$n.log" 2>&1 &
    PIDS+=($!)
done
wait_for 20 "${PIDS[0]}" test -S "$WORK/run/server1.sock" || { cat "$RES/server1.log" >&2; die "server1 did not start"; }
wait_for 20 "${PIDS[1]}" test -S "$WORK/run/server2.sock" || { cat "$RES/server2.log" >&2; die "server2 did not start"; }

# Polls `mdctrl status --json` on server1 every 20 ms; prints the JSON of the
# first status for which the Python expression COND (over `p` = pair) holds.
poll() { # timeout_s cond
    python3 - "$1" "$2" "$MDCTRL_BIN" "$CONF" <<'PY'
import json, subprocess, sys, time
timeout, cond, mdctrl, conf = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
deadline = time.time() + timeout
last = None
while time.time() < deadline:
    r = subprocess.run([mdctrl, "--config", conf, "--node", "server1", "status", "md1", "--json"],
                       capture_output=True, text=True)
    if r.returncode == 0:
        last = json.loads(r.stdout)
        p = last.get("pair") or {}
        if eval(cond, {}, {"p": p, "s": last}):
            print(json.dumps(last))
            sys.exit(0)
    time.sleep(0.02)
print(json.dumps(last), file=sys.stderr)
sys.exit(1)
PY
}

poll 30 'p.get("connection") == "connected" and p.get("peer_disk") is not None' >/dev/null \
    || die "the pair did not connect"
ctl server1 activate md1 --nomount >>"$RES/init.log" 2>&1 || { cat "$RES/init.log" >&2; die "activate failed"; }
ctl server1 status md1 --json >"$RES/status-activated.json" 2>/dev/null || true
ENGINE="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("engine","?"))' "$RES/status-activated.json" 2>/dev/null || echo '?')"

# CPU seconds (user + system) both agents used so far.
CLK_TCK="$(getconf CLK_TCK)"
agents_cpu() {
    local p total=0 f
    for p in "${PIDS[@]}"; do
        read -r -a f <"/proc/$p/stat"
        # Fields 14 and 15 (utime, stime); the comm field has no spaces here.
        total=$((total + f[13] + f[14]))
    done
    python3 -c "print(f'{$total / $CLK_TCK:.2f}')"
}

# One measured resync: `mdctrl recover md1 --wait` (the operator's command:
# it returns once the recovery finished and the pair is in sync; the agent
# answers its `watch` requests at the change, no polling interval); prints
# "wall_seconds total_bytes cpu_seconds agent_seconds" (wall: the command's
# run time, process start included; agent: the resync's own duration, status
# recovery.elapsed_ms). The timer (Python) starts before the clock, so the
# interpreter's start-up (~0.1 s here, through a pyenv shim) is not counted.
measure_recover() { # tag
    local tag="$1" out c0 c1
    drop_caches
    warm_tools
    c0="$(agents_cpu)"
    out="$(python3 - "$MDCTRL_BIN" "$CONF" "$RES/recover.log" <<'PY'
import json, subprocess, sys, time
mdctrl, conf, log = sys.argv[1], sys.argv[2], sys.argv[3]
ctl = [mdctrl, "--config", conf, "--node", "server1"]
t0 = time.time()
r = subprocess.run(ctl + ["recover", "md1", "--wait"], capture_output=True, text=True)
t1 = time.time()
with open(log, "a") as f:
    f.write(r.stdout + r.stderr)
if r.returncode != 0:
    print(r.stdout + r.stderr, file=sys.stderr)
    sys.exit(2)
s = json.loads(subprocess.run(ctl + ["status", "md1", "--json"], capture_output=True, text=True, check=True).stdout)
p = s.get("pair") or {}
if not ((p.get("recovery") or {}).get("finished") is True and p.get("in_sync") is True):
    print("recover --wait returned but the status is not finished and in sync: " + json.dumps(s), file=sys.stderr)
    sys.exit(1)
print(f"{t1 - t0:.3f}")
print(json.dumps(s))
PY
)" || die "recovery ($tag) refused or did not finish"
    c1="$(agents_cpu)"
    sed -n 2p <<<"$out" >"$RES/status-$tag.json"
    python3 -c "import json,sys; s=json.load(open(sys.argv[2])); r=s['pair']['recovery']; print(sys.argv[1], r['total_bytes'], f'{float(sys.argv[4])-float(sys.argv[3]):.2f}', f\"{r.get('elapsed_ms', 0)/1000:.3f}\")" \
        "$(sed -n 1p <<<"$out")" "$RES/status-$tag.json" "$c0" "$c1"
}

same_data() { # tag
    # The active keeps serving: compare once the pair is idle (nothing writes now).
    drop_caches
    cmp "$SRC" "$DST" >/dev/null || die "$1: the data of server1 and server2 differ after the resync"
}

# server2's disk replaced: its agent stopped, data file and cluster
# partition re-created empty (`mdctrl init`), agent started again; the next
# `mdctrl recover` is the full resync of rule R6 (new member) into it.
replace_server2_disk() {
    stop_pids "${PIDS[1]}"
    rm -f "$DST" "$WORK/data/server2.cp"
    truncate -s "${SIZE_MIB}M" "$DST"
    ctl server2 init md1 >>"$RES/init.log" 2>&1 || { cat "$RES/init.log" >&2; die "mdctrl init (server2, replaced disk) failed"; }
    RUST_LOG="${RUST_LOG:-info}" "$AGENT_BIN" --config "$CONF" --node server2 >>"$RES/server2.log" 2>&1 &
    PIDS[1]=$!
    wait_for 20 "${PIDS[1]}" test -S "$WORK/run/server2.sock" || { cat "$RES/server2.log" >&2; die "server2 did not restart"; }
    poll 30 'p.get("connection") == "connected" and p.get("peer_disk") is not None' >/dev/null \
        || die "server2 did not reconnect after its disk was replaced"
}

# REPS full resyncs: the initial construction (R6 after the activation), then
# REPS-1 times with server2's disk replaced (R6 again); the median is reported.
FULL_TIMES=(); FULL_AGENT=(); FULL_CPUS=()
for r in $(seq "$REPS"); do
    if (( r > 1 )); then replace_server2_disk; fi
    cp_runs "before full resync $r" 1
    log "full resync $r of ${SIZE_MIB} MiB ($([[ $r == 1 ]] && echo 'initial construction' || echo 'replaced disk'), R6)"
    read -r s FULL_B c a <<<"$(measure_recover "full-$r")"
    [[ "$(grep -c "decision R6 new-member" "$RES/server1.log")" -ge "$r" ]] || die "full resync $r was not rule R6"
    same_data "full-$r"
    FULL_TIMES+=("$s"); FULL_AGENT+=("$a"); FULL_CPUS+=("$c")
    log "full resync $r: $s s wall, $a s in the agent, $FULL_B bytes, both agents' CPU $c s"
done

REGION=$((REGION_KIB << 10))
DIFF_TIMES=(); DIFF_BYTES=(); DIFF_AGENT=()
for r in $(seq "$REPS"); do
    ctl server1 break md1 >>"$RES/break.log" 2>&1 || die "break failed"
    # One 4 KiB write in every DIRTY_EVERY-th region (rw=write:SKIP skips SKIP
    # bytes after each write), a different offset inside the region each run.
    fio --name=dirty --ioengine=nbd --uri="nbd+unix:///md1?socket=$WORK/run/server1-md1.nbd" \
        --rw="write:$((DIRTY_EVERY * REGION - 4096))" --bs=4k --iodepth=16 \
        --offset=$(( (r % 16) * 4096 )) --size=$((BYTES - (r % 16) * 4096)) --randrepeat=0 --buffer_compress_percentage=0 \
        --refill_buffers --output="$RES/fio-dirty-$r.txt" >/dev/null 2>&1 \
        || { cat "$RES/fio-dirty-$r.txt" >&2; die "fio (dirty) failed"; }
    read -r s b _ a <<<"$(measure_recover "diff-$r")"
    DIFF_TIMES+=("$s"); DIFF_BYTES+=("$b"); DIFF_AGENT+=("$a")
    same_data "diff-$r"
    log "differential run $r: $s s wall, $a s in the agent, $b bytes"
done

cp_runs after "$REPS"
drop_caches

python3 - "$SIZE_MIB" "$REGION_KIB" "$DIRTY_EVERY" "${FULL_TIMES[*]}" "$FULL_B" "$ENGINE" "$FSTYPE" "$AGENT_BUILT" \
    "${CP_TIMES[*]}" "${DIFF_TIMES[*]}" "${DIFF_BYTES[*]}" "${FULL_CPUS[*]}" "${FULL_AGENT[*]}" "${DIFF_AGENT[*]}" "$DD_TIME" <<'PY' | tee "$RES/table.md"
import statistics, sys, platform, os
size_mib, region_kib, every = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
full = [float(x) for x in sys.argv[4].split()]
full_b = int(sys.argv[5])
engine, fstype, built = sys.argv[6], sys.argv[7], sys.argv[8]
cp = [float(x) for x in sys.argv[9].split()]
diff = [float(x) for x in sys.argv[10].split()]
diff_b = [int(x) for x in sys.argv[11].split()]
full_cpus = [float(x) for x in sys.argv[12].split()]
full_as = [float(x) for x in sys.argv[13].split()]
diff_a = [float(x) for x in sys.argv[14].split()]
dd_s = float(sys.argv[15])
size = size_mib << 20
cp_s = statistics.median(cp)
diff_s = statistics.median(diff)
diff_as = statistics.median(diff_a)
full_s, full_a, full_cpu = statistics.median(full), statistics.median(full_as), statistics.median(full_cpus)
mib = lambda b, s: b / (1 << 20) / s
def verdict(ok):
    return "" if ok else " **(missed)**"
load = open("/proc/loadavg").read().split()[:3]
print(f"Volume {size_mib} MiB of random data, region {region_kib} KiB, {fstype} file system, "
      f"agent engine {engine}, agent built {built}, {os.cpu_count()} CPUs, load average {' '.join(load)} at the end; "
      f"medians of {len(cp)} cp runs (one right before each full resync, {len(cp) - len(full)} after the resyncs), {len(full)} full resyncs (the initial "
      f"construction, then with server2's disk replaced) and {len(diff)} differential runs; page cache dropped before each run. *wall*: from the command (`cp`, `mdctrl recover`) until "
      f"done (`cp` + fsync returned; `mdctrl recover --wait` returned: finished and in sync); *agent*: the resync's own "
      f"duration (status `recovery.elapsed_ms`).")
print()
print("| run | bytes copied | wall | agent | throughput (wall / agent) | ratio (wall / agent) | target |")
print("|---|---:|---:|---:|---:|---:|---|")
print(f"| `cp` + fsync, same file system | {size} | {cp_s:.2f} s | - | {mib(size, cp_s):.0f} MiB/s | 1.00x | reference |")
print(f"| `dd` O_DIRECT 4 MiB + fsync (second reference) | {size} | {dd_s:.2f} s | - | {mib(size, dd_s):.0f} MiB/s | {cp_s/dd_s:.2f}x | - |")
rw, ra = mib(full_b, full_s) / mib(size, cp_s), mib(full_b, full_a) / mib(size, cp_s)
print(f"| full resync, two agents on loopback | {full_b} | {full_s:.2f} s | {full_a:.2f} s | "
      f"{mib(full_b, full_s):.0f} / {mib(full_b, full_a):.0f} MiB/s | {rw:.2f}x{verdict(rw >= 0.8)} / {ra:.2f}x{verdict(ra >= 0.8)} of cp | >= 0.8x |")
fw, fa = diff_s / full_s, diff_as / full_a
print(f"| differential resync, 1 write per {every} regions | {int(statistics.median(diff_b))} | {diff_s:.3f} s | {diff_as:.3f} s | - | "
      f"{100*fw:.1f}%{verdict(fw <= 0.03)} / {100*fa:.1f}%{verdict(fa <= 0.03)} of full | <= 3% |")
print()
print(f"Full resync: both agents together used {full_cpu:.2f} s of CPU (median; {100*full_cpu/full_s:.0f}% of one CPU over the run). "
      f"Full runs (wall): {', '.join(f'{x:.2f}' for x in full)} s, (agent): {', '.join(f'{x:.2f}' for x in full_as)} s.")
pairs = [c / f for c, f in zip(cp, full)]
print(f"Pairwise (the cp run right before each full resync / that resync, wall): "
      f"{', '.join(f'{x:.2f}x' for x in pairs)}; median {statistics.median(pairs):.2f}x.")
print(f"cp runs (the first {len(full)} each right before a full resync): {', '.join(f'{x:.2f}' for x in cp)} s; differential runs (wall): {', '.join(f'{x:.3f}' for x in diff)} s, "
      f"(agent): {', '.join(f'{x:.3f}' for x in diff_a)} s ({', '.join(str(b) for b in diff_b)} bytes)")
PY
