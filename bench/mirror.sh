#!/usr/bin/env bash
# nbd-mirror replication benchmark: what mirroring costs. The same fio jobs
# (fio's nbd ioengine = libnbd, as in bench/run.sh) against
#   - `nbdkit file`                     (reference)
#   - a standalone mirror-agent          (the baseline of the targets)
#   - mirrored pairs in mode sync, semi and async
# all serving the same backing file on a real disk (BENCH_DIR, /var/tmp); each
# pair's standby (server2, on loopback) keeps its data on tmpfs (PEER_DIR,
# /dev/shm) so the one disk is not charged twice.
# See the "Mirrored modes" section of bench/README.md for the method and the
# latest results.
#
#   bench/mirror.sh            full run (~4 minutes)
#   QUICK=1 bench/mirror.sh    short run (~1.5 minutes: 1 run per job)
#
# Environment (all optional):
#   RUNTIME=S RAMP=S  seconds measured per fio job / ramp before (default 4 / 1;
#                     QUICK: 3 / 1)
#   REPS=N            runs of every job per server, the server order reversed
#                     on every run (default 2; QUICK: 1)
#   MODES="..."       mirrored modes, from: sync semi async (default all)
#   ONLY_JOBS="..."   run only these jobs, from: seqwrite randwrite lat1
#                     (default all; for quick A/B runs of one row)
#   DIRECT_IO=auto|off  the agents' direct_io (default auto = the production
#                     default: O_DIRECT on the disk, buffered on tmpfs); nbdkit
#                     gets cache=none with auto, its defaults with off
#   ENGINE=io_uring|portable  the resources' `engine` (both nodes; default unset =
#                     the agent's automatic choice, io_uring where available)
#   BENCH_DIR=DIR     the active side's backing file (default /var/tmp)
#   PEER_DIR=DIR      the standbys' data (default /dev/shm)
#   SIZE_MIB=N        volume size in MiB (default 1024)
#   KEEP_DIRTY=N REGION_SIZE=SZ HOT_EXTENT_SIZE=SZ  the resources' keep_dirty
#                     (hot extents) / region_size / hot_extent_size (default:
#                     unset = the agent's defaults, 1024 / 64KiB / 4MiB)
#   RPO_SAMPLE=S      interval of `mdctrl status --json` samples on the active
#                     during mirrored jobs (default 0.5; 0 = off)
#   AGENT_BIN, MDCTRL_BIN  binaries (default target/release/{mirror-agent,mdctrl})
#   OUT=DIR           keep the raw results (fio JSON, CPU, status samples, logs)
#   DROP_CACHES=0     do not drop the page cache before each job (default:
#                     drop it when root)
#   GUEST_HALT_POLL_NS=N  set the KVM guest's halt polling (cpuidle-haltpoll,
#                     root) to N ns for the run and restore it on exit
#                     (default: leave the machine's setting; the report says which)
#   FLOOR=0           skip the replication floor (bench/floor.rs, built with
#                     rustc; default: run it after the jobs, REPS times per
#                     seqwrite/randwrite job, RUNTIME seconds each)
#
# Nothing is installed: missing tools are reported with the apt-get command.
# Every process started here is stopped, and the temp dirs removed, on exit.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
    RUNTIME="${RUNTIME:-3}"; RAMP="${RAMP:-1}"; REPS="${REPS:-1}"
else
    RUNTIME="${RUNTIME:-4}"; RAMP="${RAMP:-1}"; REPS="${REPS:-2}"
fi
MODES="${MODES:-sync semi async}"
DIRECT_IO="${DIRECT_IO:-auto}"
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
PEER_DIR="${PEER_DIR:-/dev/shm}"
SIZE_MIB="${SIZE_MIB:-1024}"
RPO_SAMPLE="${RPO_SAMPLE:-0.5}"
FLOOR="${FLOOR:-1}"
AGENT_BIN="${AGENT_BIN:-$ROOT/target/release/mirror-agent}"
MDCTRL_BIN="${MDCTRL_BIN:-$ROOT/target/release/mdctrl}"

BENCH_NAME=mirror-bench
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# --- prerequisites (checked, never installed) --------------------------------
require_tools fio nbdkit python3
[[ -d "$PEER_DIR" ]] || die "PEER_DIR $PEER_DIR does not exist"
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer"
[[ "$SIZE_MIB" =~ ^[1-9][0-9]*$ ]] || die "SIZE_MIB must be a positive integer"
case "$DIRECT_IO" in
    auto) NBDKIT_ARGS=(cache=none) ;;
    off) NBDKIT_ARGS=() ;;
    # "on" would make the tmpfs standby fail to open its data.
    *) die "DIRECT_IO must be auto or off" ;;
esac
for m in $MODES; do
    case "$m" in sync|semi|async) ;; *) die "unknown mode '$m' (sync, semi, async)";; esac
done
ONLY_JOBS="${ONLY_JOBS:-seqwrite randwrite lat1}"
for j in $ONLY_JOBS; do
    case "$j" in seqwrite|randwrite|lat1) ;; *) die "unknown job '$j' (seqwrite, randwrite, lat1)";; esac
done

DROP="$(drop_caches_setting)"

# --- temp dirs and cleanup -----------------------------------------------------
WORK="$(mktemp -d "$BENCH_DIR/nbd-mirror-mbench.XXXXXX")"
PEERW="$(mktemp -d "$PEER_DIR/nbd-mirror-mbench.XXXXXX")"
RES="$WORK/results"
mkdir -p "$RES" "$WORK/run" "$WORK/data"
declare -A PID=() PEER=() URI=() CTL=()
SAMPLERS=()
RPOPID=""

stop_all() {
    [[ -n "$RPOPID" ]] && { kill_now "$RPOPID"; RPOPID=""; }
    kill_now "${SAMPLERS[@]}"
    SAMPLERS=()
    stop_pids "${PID[@]}" "${PEER[@]}"
    PID=(); PEER=()
}

on_exit_cleanup "$WORK" "$PEERW"
set_guest_halt_poll

private_binaries

# The replication floor (see bench/floor.rs): std only, built here in a second.
FLOOR_BIN=""
if [[ "$FLOOR" == 1 ]]; then
    if command -v rustc >/dev/null; then
        rustc -O --edition 2021 -o "$WORK/floor" "$HERE/floor.rs" || die "building bench/floor.rs failed"
        FLOOR_BIN="$WORK/floor"
    else
        log "WARNING: no rustc: the replication floor is skipped (FLOOR=0 to silence)"
    fi
fi

# --- backing file (active side) -------------------------------------------------
DATA="$WORK/data/md1.img"
FSTYPE="$(df --output=fstype "$WORK" | tail -1 | tr -d ' ')"
PEER_FSTYPE="$(df --output=fstype "$PEERW" | tail -1 | tr -d ' ')"
[[ "$FSTYPE" == tmpfs ]] && log "WARNING: BENCH_DIR $BENCH_DIR is tmpfs: the numbers will not reflect a disk"
[[ "$PEER_FSTYPE" == tmpfs ]] || log "WARNING: PEER_DIR $PEER_DIR is $PEER_FSTYPE, not tmpfs: the standbys share the disk with the active side"
log "writing the ${SIZE_MIB} MiB backing file $DATA ($FSTYPE)"
# Really written (no unwritten extents), and all zeros, so every pair can be
# initialised with --blank against a zeroed standby.
dd if=/dev/zero of="$DATA" bs=1M count="$SIZE_MIB" oflag=direct conv=fsync status=none

status_json() { # tag out
    ${CTL[$1]} status md1 --json >"$2" 2>/dev/null
}

# --- servers ---------------------------------------------------------------------
start_nbdkit() { # tag
    local tag="$1" sock="$WORK/run/$1.sock"
    nbdkit -f -U "$sock" file "$DATA" "${NBDKIT_ARGS[@]}" >"$RES/$tag.log" 2>&1 &
    PID[$tag]=$!
    wait_for 10 "${PID[$tag]}" test -S "$sock" || { cat "$RES/$tag.log" >&2; die "nbdkit ($tag) did not create $sock"; }
    URI[$tag]="nbd+unix:///?socket=$sock"
    echo "nbdkit $(nbdkit --version | awk '{print $2}') file ${NBDKIT_ARGS[*]:-(defaults)}" >"$RES/$tag.desc"
}

# A standalone agent (mode "") or a pair (server1 = active on $DATA, server2 =
# standby on tmpfs), each with its own ports, directories and secret.
start_agent() { # tag mode
    local tag="$1" mode="$2"
    local dir="$WORK/$tag" pdir="$PEERW/$tag"
    mkdir -p "$dir/run" "$dir/data" "$pdir"
    local ports
    read -r -a ports <<<"$(free_ports 4)"
    {
        echo "[cluster]"
        echo "name = \"mbench-$tag\""
        [[ -n "$mode" ]] && echo "secret_file = \"$dir/secret\""
        echo
        echo "[[server]]"
        echo "name = \"server1\""
        echo "address = \"127.0.0.1\""
        echo "control_port = ${ports[0]}"
        echo "admin_socket = \"$dir/run/server1.sock\""
        if [[ -n "$mode" ]]; then
            echo
            echo "[[server]]"
            echo "name = \"server2\""
            echo "address = \"127.0.0.1\""
            echo "control_port = ${ports[1]}"
            echo "admin_socket = \"$dir/run/server2.sock\""
        fi
        echo
        echo "[[resource]]"
        echo "name = \"md1\""
        echo "size = \"${SIZE_MIB}MiB\""
        [[ -n "$mode" ]] && echo "mode = \"$mode\""
        echo "direct_io = \"$DIRECT_IO\""
        [[ -n "${ENGINE:-}" ]] && echo "engine = \"$ENGINE\""
        [[ -n "${KEEP_DIRTY:-}" ]] && echo "keep_dirty = $KEEP_DIRTY"
        [[ -n "${REGION_SIZE:-}" ]] && echo "region_size = \"$REGION_SIZE\""
        [[ -n "${HOT_EXTENT_SIZE:-}" ]] && echo "hot_extent_size = \"$HOT_EXTENT_SIZE\""
        echo
        echo "[resource.server.server1]"
        echo "data_path = \"$DATA\""
        echo "cluster_partition = \"$dir/data/md1.cp\""
        echo "mirror_port = ${ports[2]}"
        echo "nbd_socket = \"$dir/run/server1-md1.nbd\""
        if [[ -n "$mode" ]]; then
            echo
            echo "[resource.server.server2]"
            echo "data_path = \"$pdir/md1.img\""
            echo "cluster_partition = \"$pdir/md1.cp\""
            echo "mirror_port = ${ports[3]}"
            echo "nbd_socket = \"$dir/run/server2-md1.nbd\""
        fi
    } >"$dir/cluster.toml"
    local nodes=(server1) n
    if [[ -n "$mode" ]]; then
        nodes+=(server2)
        (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$dir/secret"; echo >>"$dir/secret")
        # The standby's data: zeros written in full, like the dd-written active
        # file. A sparse tmpfs file would charge the first pass of the first
        # job with allocating and zeroing its pages, a cost no disk has.
        dd if=/dev/zero of="$pdir/md1.img" bs=1M count="$SIZE_MIB" status=none
    fi
    CTL[$tag]="$MDCTRL_BIN --config $dir/cluster.toml --node server1"
    for n in "${nodes[@]}"; do
        local init=(init md1)
        [[ -n "$mode" ]] && init+=(--blank)
        "$MDCTRL_BIN" --config "$dir/cluster.toml" --node "$n" "${init[@]}" >>"$RES/$tag.init" 2>&1 \
            || { cat "$RES/$tag.init" >&2; die "mdctrl init ($tag, $n) failed"; }
    done
    RUST_LOG="${RUST_LOG:-info}" "$AGENT_BIN" --config "$dir/cluster.toml" --node server1 >"$RES/$tag.log" 2>&1 &
    PID[$tag]=$!
    if [[ -n "$mode" ]]; then
        RUST_LOG="${RUST_LOG:-info}" "$AGENT_BIN" --config "$dir/cluster.toml" --node server2 >"$RES/$tag.peer.log" 2>&1 &
        PEER[$tag]=$!
        wait_for 20 "${PEER[$tag]}" test -S "$dir/run/server2.sock" || { cat "$RES/$tag.peer.log" >&2; die "standby ($tag) did not start"; }
    fi
    wait_for 20 "${PID[$tag]}" test -S "$dir/run/server1.sock" || { cat "$RES/$tag.log" >&2; die "agent ($tag) did not start"; }
    ${CTL[$tag]} activate md1 --nomount >>"$RES/$tag.init" 2>&1 || { cat "$RES/$tag.init" "$RES/$tag.log" >&2; die "mdctrl activate ($tag) failed"; }
    wait_for 10 "${PID[$tag]}" test -S "$dir/run/server1-md1.nbd" || die "agent ($tag) did not create its NBD socket"
    status_json "$tag" "$RES/$tag.status.json" || true
    if [[ -n "$mode" ]]; then
        "$MDCTRL_BIN" --config "$dir/cluster.toml" --node server2 status md1 --json >"$RES/$tag.peer.status.json" 2>/dev/null || true
        # Writes must be replicated from the first job on: the session is up.
        wait_for 20 "${PID[$tag]}" python3 -c '
import json, subprocess, sys
s = json.loads(subprocess.run(sys.argv[1:], capture_output=True, check=True).stdout)
p = s.get("pair") or {}
sys.exit(0 if p.get("connection") == "connected" and p.get("replicating") else 1)' \
            ${CTL[$tag]} status md1 --json || { ${CTL[$tag]} status md1 >&2 || true; die "pair $tag is not replicating after activation"; }
    fi
    python3 - "$RES/$tag.status.json" "${RES}/$tag.peer.status.json" "$mode" >"$RES/$tag.desc" <<'PY'
import json, sys
def eng(p):
    try:
        return json.load(open(p)).get("engine", "?")
    except (OSError, ValueError):
        return "?"
mode = sys.argv[3]
if mode:
    print(f"mirror-agent pair, mode={mode}; active: {eng(sys.argv[1])}; standby (tmpfs): {eng(sys.argv[2])}")
else:
    print(f"mirror-agent standalone: {eng(sys.argv[1])}")
PY
    URI[$tag]="nbd+unix:///md1?socket=$dir/run/server1-md1.nbd"
}

# Wall clock, whole-machine CPU, the active's and the standby's CPU ticks
# (process and threads).
snapshot() { # tag file
    local tag="$1" p t
    {
        echo "wall $(date +%s.%N)"
        head -1 /proc/stat
        for role in active standby; do
            if [[ $role == active ]]; then p="${PID[$tag]}"; else p="${PEER[$tag]:-}"; fi
            [[ -n "$p" ]] || continue
            echo "$role proc $(cat "/proc/$p/stat" 2>/dev/null)"
            for t in /proc/"$p"/task/*; do
                echo "$role task $(cat "$t/stat" 2>/dev/null)"
            done
        done
    } >"$2"
}

# The active's RPO meter during a mirrored job (JSON lines, with a timestamp).
start_rpo_sampler() { # tag file
    local tag="$1" out="$2"
    [[ -n "${PEER[$tag]:-}" && "$RPO_SAMPLE" != 0 ]] || return 0
    ( while :; do
          printf '{"t": %s, "s": ' "$(date +%s.%N)"
          ${CTL[$tag]} status md1 --json 2>/dev/null | tr -d '\n' || printf 'null'
          echo '}'
          sleep "$RPO_SAMPLE"
      done ) >"$out" &
    RPOPID=$!
}

stop_rpo_sampler() {
    [[ -n "$RPOPID" ]] || return 0
    kill "$RPOPID" 2>/dev/null || true
    wait "$RPOPID" 2>/dev/null || true
    RPOPID=""
}

# --- fio jobs ---------------------------------------------------------------------
ALL_JOBS=( # name rw bs iodepth
    "seqwrite write 1M 8"
    "randwrite randwrite 4k 32"
    "lat1 randwrite 4k 1"
)
JOBS=()
for j in "${ALL_JOBS[@]}"; do
    [[ " $ONLY_JOBS " == *" ${j%% *} "* ]] && JOBS+=("$j")
done

run_fio() { # tag job rep rw bs qd
    local tag="$1" name="$2" rep="$3" rw="$4" bs="$5" qd="$6" extra=()
    local f="$RES/$tag.$name.$rep"
    [[ "$name" == lat1 ]] && extra=(--lat_percentiles=1 --percentile_list=50:99:99.9)
    kill -0 "${PID[$tag]}" 2>/dev/null || { cat "$RES/$tag.log" >&2; die "server $tag died"; }
    if [[ -n "${PEER[$tag]:-}" ]]; then
        kill -0 "${PEER[$tag]}" 2>/dev/null || { cat "$RES/$tag.peer.log" >&2; die "standby of $tag died"; }
    fi
    drop_caches
    [[ -n "${CTL[$tag]:-}" ]] && { status_json "$tag" "$f.st0" || true; }
    snapshot "$tag" "$f.cpu0"
    start_rpo_sampler "$tag" "$f.rpo"
    # randrepeat=1 (fio's default seed): the same offsets for every server.
    fio --name="$name" --ioengine=nbd --uri="${URI[$tag]}" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --numjobs=1 --time_based --runtime="$RUNTIME" \
        --ramp_time="$RAMP" --randrepeat=1 "${extra[@]}" \
        --output-format=json --output="$f.json" \
        >"$f.fio.log" 2>&1 || { cat "$f.fio.log" >&2; die "fio $name against $tag failed"; }
    stop_rpo_sampler
    snapshot "$tag" "$f.cpu1"
    [[ -n "${CTL[$tag]:-}" ]] && { status_json "$tag" "$f.st1" || true; }
    return 0
}

START=$SECONDS
TAGS=(nbdkit standalone)
for m in $MODES; do TAGS+=("$m"); done
echo "${TAGS[*]}" >"$RES/tags"
echo "$REPS" >"$RES/reps"
for j in "${JOBS[@]}"; do echo "${j%% *}"; done >"$RES/jobs"

log "starting: ${TAGS[*]} (direct_io=$DIRECT_IO, standbys in $PEERW)"
start_nbdkit nbdkit
start_agent standalone ""
for m in $MODES; do start_agent "$m" "$m"; done

# Every job runs REPS times on each server; the server order is reversed on
# every repetition so a slow drift of the shared machine's load hits all alike.
for j in "${JOBS[@]}"; do
    read -r name rw bs qd <<<"$j"
    for rep in $(seq "$REPS"); do
        if ((rep % 2)); then order=("${TAGS[@]}"); else order=(); for t in "${TAGS[@]}"; do order=("$t" "${order[@]}"); done; fi
        for t in "${order[@]}"; do run_fio "$t" "$name" "$rep" "$rw" "$bs" "$qd"; done
    done
    log "  $name done"
done
for t in "${TAGS[@]}"; do
    [[ -n "${CTL[$t]:-}" ]] && { status_json "$t" "$RES/$t.status.end.json" || true; }
done
stop_all

# The replication floor for the throughput jobs, on the standbys' file system,
# with the servers stopped (the machine as the jobs had it, minus idle agents).
if [[ -n "$FLOOR_BIN" ]]; then
    for j in "${JOBS[@]}"; do
        read -r name _ _ qd <<<"$j"
        case "$name" in
            seqwrite) fargs=(seq "$RUNTIME" "$PEERW/floor.img" "$SIZE_MIB") ;;
            randwrite) fargs=(rand "$RUNTIME" "$PEERW/floor.img" "$SIZE_MIB" "$qd") ;;
            *) continue ;;
        esac
        for rep in $(seq "$REPS"); do
            drop_caches
            "$FLOOR_BIN" "${fargs[@]}" >"$RES/floor.$name.$rep" 2>"$RES/floor.$name.$rep.err" \
                || { cat "$RES/floor.$name.$rep.err" >&2; die "replication floor ($name) failed"; }
        done
        rm -f "$PEERW/floor.img"
    done
    log "  replication floor done"
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    machine_line
    echo "agent: $(basename "$AGENT_BIN") built $AGENT_BUILT (tree at $(tree_state))"
    echo "active data: ${SIZE_MIB} MiB file on $(df --output=source "$WORK" | tail -1) ($FSTYPE), written with dd, shared by all servers; standbys' data: files on $PEER_FSTYPE ($PEER_DIR), written with dd; page cache dropped before each job: $([[ $DROP == 1 ]] && echo yes || echo no)"
    echo "client: $(fio --version) ioengine=nbd (libnbd), 1 connection; each job ${RUNTIME}s measured after ${RAMP}s ramp, ${REPS} run(s) per server, server order reversed on every run; RPO samples every ${RPO_SAMPLE}s during mirrored jobs; resource keep_dirty=${KEEP_DIRTY:-default} region_size=${REGION_SIZE:-default} hot_extent_size=${HOT_EXTENT_SIZE:-default}; bench time $((SECONDS - START))s"
} >"$RES/meta"

python3 - "$RES" <<'PY'
"""Markdown report of the raw results: throughput/latency, ratios vs the
standalone agent and the targets, CPU per I/O of active and standby, and the
RPO meter (ack2 latency by Little's law)."""
import json, os, re, sys
from collections import defaultdict

RES = sys.argv[1]
CLK = os.sysconf("SC_CLK_TCK")
TAGS = open(os.path.join(RES, "tags")).read().split()
REPS = range(1, int(open(os.path.join(RES, "reps")).read()) + 1)
MODES = [t for t in TAGS if t in ("sync", "semi", "async")]
JOBS = [("seqwrite", "seq write 1 MiB QD8"), ("randwrite", "rand write 4 KiB QD32"),
        ("lat1", "QD1 rand write 4 KiB")]
# (row label, job, getter, unit, higher is better)
ROWS = [
    ("seq write 1 MiB QD8", "seqwrite", lambda j: j["write"]["bw_bytes"] / 2**20, "MiB/s", True),
    ("rand write 4 KiB QD32", "randwrite", lambda j: j["write"]["iops"], "IOPS", True),
    ("QD1 write 4 KiB p50", "lat1", lambda j: j["write"]["lat_ns"]["percentile"]["50.000000"] / 1000, "µs", False),
    ("QD1 write 4 KiB p99", "lat1", lambda j: j["write"]["lat_ns"]["percentile"]["99.000000"] / 1000, "µs", False),
]
# Targets, mode sync vs standalone: row -> (bound, kind)
TARGETS = {"seq write 1 MiB QD8": (0.90, ">="), "rand write 4 KiB QD32": (0.80, ">="),
           "QD1 write 4 KiB p50": (1.5, "<="), "QD1 write 4 KiB p99": (1.5, "<=")}
# Only the jobs that ran (ONLY_JOBS).
RAN = open(os.path.join(RES, "jobs")).read().split()
JOBS = [j for j in JOBS if j[0] in RAN]
ROWS = [r for r in ROWS if r[1] in RAN]
TARGETS = {k: v for k, v in TARGETS.items() if any(r[0] == k for r in ROWS)}


def fio(tag, job, rep):
    text = open(os.path.join(RES, f"{tag}.{job}.{rep}.json")).read()
    return json.loads(text[text.index("{"):])["jobs"][0]


def metric(tag, job, get):
    v = [get(fio(tag, job, r)) for r in REPS]
    return sum(v) / len(v), v


def spread(v):
    m = sum(v) / len(v)
    return 50 * (max(v) - min(v)) / m if m else 0.0


def desc(tag):
    try:
        return open(os.path.join(RES, f"{tag}.desc")).read().strip()
    except OSError:
        return tag


def ticks(line):
    rest = line[line.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])


def comm(line):
    return line[line.index("(") + 1:line.rindex(")")]


def snap(path):
    s = {"active": 0, "standby": 0, "tasks": {}}
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("wall "):
            s["wall"] = float(line.split()[1])
        elif line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            s["total"], s["idle"] = sum(v[:8]), v[3] + v[4]
        elif ")" in line:
            role, kind, rest = line.split(" ", 2)
            if kind == "proc":
                s[role] = ticks(rest)
            else:
                s["tasks"][(role, rest.split()[0])] = (comm(rest), ticks(rest))
    return s


def busy_secs(a, b):
    """CPU-seconds the whole machine was busy between snapshots a and b."""
    return ((b["total"] - a["total"]) - (b["idle"] - a["idle"])) / CLK


def cpu(tag, job):
    """Mean over runs: machine busy cores, active cores, standby cores,
    {(role, thread name): cores}."""
    wall = busy = act = stb = 0.0
    th = defaultdict(float)
    for r in REPS:
        a = snap(os.path.join(RES, f"{tag}.{job}.{r}.cpu0"))
        b = snap(os.path.join(RES, f"{tag}.{job}.{r}.cpu1"))
        wall += b["wall"] - a["wall"]
        busy += busy_secs(a, b)
        act += (b["active"] - a["active"]) / CLK
        stb += (b["standby"] - a["standby"]) / CLK
        for key, (c, t) in b["tasks"].items():
            th[(key[0], re.sub(r"-\d+$", "", c))] += (t - a["tasks"].get(key, (c, 0))[1]) / CLK
    return busy / wall, act / wall, stb / wall, {k: v / wall for k, v in th.items()}


def rpo(tag, job):
    """From the RPO samples and the status before/after each run: ack2'd
    writes/s, mean writes not yet ack2 (in flight), Little's-law ack2 latency,
    max age of the oldest non-durable write, breaks and local-only writes."""
    rate = inflight = 0.0
    n = 0
    oldest = 0
    breaks = local = 0
    for r in REPS:
        samples = []
        p = os.path.join(RES, f"{tag}.{job}.{r}.rpo")
        if os.path.exists(p):
            for line in open(p):
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                x = ((d.get("s") or {}).get("pair") or {}).get("rpo")
                if x:
                    samples.append((d["t"], x))
        if len(samples) >= 3:
            t0, x0 = samples[0]
            t1, x1 = samples[-1]
            if t1 > t0:
                rate += (x1["writes_replicated"] - x0["writes_replicated"]) / (t1 - t0)
                inflight += sum(x["unacked1_writes"] + x["unacked2_writes"] for _, x in samples) / len(samples)
                n += 1
            oldest = max(oldest, max(x["oldest_not_durable_ms"] for _, x in samples))
        try:
            s0 = json.load(open(os.path.join(RES, f"{tag}.{job}.{r}.st0")))["pair"]["rpo"]
            s1 = json.load(open(os.path.join(RES, f"{tag}.{job}.{r}.st1")))["pair"]["rpo"]
            breaks += s1["breaks"] - s0["breaks"]
            local += s1["writes_local_only"] - s0["writes_local_only"]
        except (OSError, ValueError, KeyError, TypeError):
            breaks = local = None
            break
    if not n:
        return None
    rate /= n
    inflight /= n
    lat = inflight / rate * 1e6 if rate else float("nan")
    return rate, inflight, lat, oldest, breaks, local


def floor_runs(job):
    """The replication floor's lines for a job (bench/floor.rs), parsed."""
    out = []
    for r in REPS:
        p = os.path.join(RES, f"floor.{job}.{r}")
        if os.path.exists(p):
            out.append({k: float(v) for k, v in (kv.split("=") for kv in open(p).read().split())
                        if k != "mode"})
    return out


def machine_us_per_op(tag, job, rep):
    """Machine CPU (every process) per client write in one run of a job."""
    a = snap(os.path.join(RES, f"{tag}.{job}.{rep}.cpu0"))
    b = snap(os.path.join(RES, f"{tag}.{job}.{rep}.cpu1"))
    busy = busy_secs(a, b)
    iops = fio(tag, job, rep)["write"]["iops"]
    return busy / (b["wall"] - a["wall"]) / iops * 1e6 if iops else float("nan")


def floor_report():
    """The most a pair could do on this box: the standalone agent's machine
    CPU per write plus the floor's, on every CPU the box has. Generous on
    purpose: the floor's cheapest run, the standalone's most favourable."""
    rows = [(label, job, unit, runs) for label, job, _, unit, _ in ROWS
            if (runs := floor_runs(job))]
    if not rows or "standalone" not in TAGS:
        return
    ncpu = os.cpu_count()
    print("\nReplication floor (bench/floor.rs, run after the jobs on the standbys' file system): "
          "what any pair must add to the standalone agent's work on this one box: loopback TCP "
          "send, receive into memory, write to the standby's file, plus a 16-byte ack per 4 KiB "
          "write; no CRC, no framing, no task hand-offs, one busy thread per role. **Best a pair "
          f"could do** = {ncpu} CPUs / (standalone's machine CPU per write + floor's CPU per write), "
          "i.e. every cycle of the machine busy and nothing else to do, against the standalone's "
          "rate in the same run; the floor's cheapest run and the standalone run most favourable "
          "to the pair, so the best is generous.\n")
    print("| job | floor CPU per write (sender + receiver + acks) | floor rate alone | "
          "standalone: machine CPU per write | best a pair could do | best / standalone | "
          "sync target | does the CPU allow it? |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for label, job, unit, fruns in rows:
        fl = min(fruns, key=lambda f: f["cpu_us_per_op"])
        cpu_us = fl["cpu_us_per_op"]
        parts = " + ".join(f"{fl[k]:.1f}" for k in ("sender_us", "receiver_us", "acks_us"))
        rate = fl["ops"] / fl["secs"]
        # Per standalone run: the best pair against that run's rate; the most
        # favourable run counts.
        runs = []
        for r in REPS:
            m = machine_us_per_op("standalone", job, r)
            b = ncpu * 1e6 / (m + cpu_us)
            iops = fio("standalone", job, r)["write"]["iops"]
            runs.append((b / iops if iops else float("nan"), m, b))
        ratio, mach, best = max(runs)
        per = "MiB" if unit == "MiB/s" else "write"
        bound, kind = TARGETS.get(label, (None, None))
        verdict = "-" if bound is None else ("yes" if ratio >= bound else "**no**")
        print(f"| {label} | {cpu_us:.1f} µs per {per} ({parts}) | {rate:.0f} {unit} | "
              f"{mach:.1f} µs per {per} | {best:.0f} {unit} | "
              f"{min(ratio, 1.0):.2f}x{' (CPU is not the limit)' if ratio >= 1.0 else ''} | "
              f"{f'{kind} {bound:.2f}x' if bound else '-'} | {verdict} |")


def main():
    meta = open(os.path.join(RES, "meta")).read().strip()
    print("\n".join(f"- {m}" for m in meta.splitlines()))
    print()
    for t in TAGS:
        print(f"- `{t}`: {desc(t)}")
    print()
    print("Values are means over the runs, ±N% = half the min-max range across runs. "
          "Ratios are **mode / standalone** (and nbdkit / standalone): for throughput "
          "higher is better, for latency lower is better.\n")
    head = ["job"] + TAGS + [f"{t}/standalone" for t in TAGS if t != "standalone"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    values = {}
    for label, job, get, unit, _ in ROWS:
        cells = [label]
        for t in TAGS:
            m, v = metric(t, job, get)
            values[(label, t)] = m
            fmt = f"{m:.0f}" if unit != "µs" else f"{m:.1f}"
            cells.append(f"{fmt} {unit} ±{spread(v):.0f}%")
        base = values[(label, "standalone")]
        for t in TAGS:
            if t != "standalone":
                cells.append(f"{values[(label, t)] / base:.2f}x" if base else "-")
        print("| " + " | ".join(cells) + " |")

    if "sync" in MODES:
        print("\nTargets (mode `sync` vs the standalone agent):\n")
        print("| target | sync / standalone | met? |")
        print("|---|---:|---|")
        for label, (bound, kind) in TARGETS.items():
            r = values[(label, "sync")] / values[(label, "standalone")]
            ok = r >= bound if kind == ">=" else r <= bound
            print(f"| {label} {kind} {bound:.2f}x | {r:.2f}x | {'**met**' if ok else '**NOT met**'} |")

    floor_report()

    print("\nCPU during the jobs: cores = CPU-seconds per wall second (the machine has "
          f"{os.cpu_count()}); µs/op = CPU time per client I/O; machine = every process on the box.\n")
    print("| job | server | active cores | active µs/op | standby cores | standby µs/op | "
          "total µs/op | machine busy cores | busiest threads (cores) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for job, jlabel in JOBS:
        for t in TAGS:
            iops, _ = metric(t, job, lambda j: j["write"]["iops"])
            busy, act, stb, th = cpu(t, job)
            per = lambda c: c / iops * 1e6 if iops else float("nan")
            st = f"{stb:.2f}" if t in MODES else "-"
            stp = f"{per(stb):.1f}" if t in MODES else "-"
            top = sorted(th.items(), key=lambda kv: -kv[1])[:4]
            tops = ", ".join(f"{'S:' if r == 'standby' else ''}{n} {c:.2f}" for (r, n), c in top if c >= 0.01) or "-"
            print(f"| {jlabel} | {t} | {act:.2f} | {per(act):.1f} | {st} | {stp} | "
                  f"{per(act + stb):.1f} | {busy:.2f} | {tops} |")
    print("\n(`S:` = a thread of the standby.)")

    if MODES:
        print("\nReplication during the jobs (the active's `mdctrl status --json` RPO meter, "
              "sampled; ack2 latency = mean writes not yet ack2 / ack2 rate, Little's law):\n")
        print("| job | mode | ack2'd writes/s | client IOPS | mean writes not ack2 | ack2 latency (est.) | "
              "max oldest not durable | breaks | local-only writes |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for job, jlabel in JOBS:
            for t in MODES:
                iops, _ = metric(t, job, lambda j: j["write"]["iops"])
                x = rpo(t, job)
                if x is None:
                    print(f"| {jlabel} | {t} | - | {iops:.0f} | - | - | - | - | - |")
                    continue
                rate, infl, lat, oldest, br, lo = x
                print(f"| {jlabel} | {t} | {rate:.0f} | {iops:.0f} | {infl:.1f} | {lat:.0f} µs | "
                      f"{oldest} ms | {br if br is not None else '?'} | {lo if lo is not None else '?'} |")


main()
PY
