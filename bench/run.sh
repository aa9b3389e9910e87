#!/usr/bin/env bash
# nbd-mirror NBD benchmark: the agent's NBD server vs `nbdkit file`, same
# backing file, same fio jobs (fio's nbd ioengine = libnbd client).
# See bench/README.md for the method and the latest results.
#
#   bench/run.sh            full run (~7 minutes)
#   QUICK=1 bench/run.sh    short run (~1 minute, buffered io_uring pair only)
#
# Environment (all optional):
#   RUNTIME=S RAMP=S  seconds measured per fio job / ramp before measuring
#                     (default 3 / 1, also with QUICK)
#   REPS=N            repetitions of every job per server, alternating the
#                     server order (ABBA...) (default 2; QUICK: 1)
#   PAIRS="..."       comparisons to run, from: buffered portable direct
#                     (default all three; QUICK: buffered)
#   BENCH_DIR=DIR     where the backing file lives (default /var/tmp; use a
#                     real disk, not tmpfs)
#   SIZE_MIB=N        backing file size in MiB (default 8192: larger than any
#                     job reads, so no job reads a block twice; see README)
#   AGENT_BIN, MDCTRL_BIN  binaries (default target/release/{mirror-agent,mdctrl})
#   OUT=DIR           keep the raw results (fio JSON, CPU/RSS samples, logs)
#   DROP_CACHES=0     do not drop the page cache before each job (default:
#                     drop it when root)
#   ONLY_JOBS="..."   run only these jobs, from: seqwrite seqread randwrite
#                     randread lat1 (default all; for quick A/B runs)
#   DIRECT_REFS=0     in the direct pair, skip the two O_DIRECT references
#                     (qemu-nbd cache=none aio=io_uring, and fio on the backing
#                     file with no server); default 1
#   GUEST_HALT_POLL_NS=N  set the KVM guest's halt polling (cpuidle-haltpoll,
#                     root) to N ns for the run and restore it on exit
#                     (default: leave the machine's setting; the report says which)
#
# Nothing is installed: missing tools are reported with the apt-get command.
# Every process started here is stopped, and the temp dir removed, on exit.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
    RUNTIME="${RUNTIME:-3}"; RAMP="${RAMP:-1}"; REPS="${REPS:-1}"; PAIRS="${PAIRS:-buffered}"
else
    RUNTIME="${RUNTIME:-3}"; RAMP="${RAMP:-1}"; REPS="${REPS:-2}"; PAIRS="${PAIRS:-buffered portable direct}"
fi
BENCH_DIR="${BENCH_DIR:-/var/tmp}"
SIZE_MIB="${SIZE_MIB:-8192}"
AGENT_BIN="${AGENT_BIN:-$ROOT/target/release/mirror-agent}"
MDCTRL_BIN="${MDCTRL_BIN:-$ROOT/target/release/mdctrl}"

BENCH_NAME=bench
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# --- prerequisites (checked, never installed) --------------------------------
require_tools fio nbdkit python3
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer"
for p in $PAIRS; do
    case "$p" in buffered|portable|direct) ;; *) die "unknown pair '$p' (buffered, portable, direct)";; esac
done
DIRECT_REFS="${DIRECT_REFS:-1}"
[[ "$DIRECT_REFS" == 0 || "$DIRECT_REFS" == 1 ]] || die "DIRECT_REFS must be 0 or 1"
QEMU_NBD=1
if [[ " $PAIRS " == *" direct "* && "$DIRECT_REFS" == 1 ]] && ! command -v qemu-nbd >/dev/null; then
    # An optional reference: the targets are against nbdkit. Said loudly, and
    # in the report.
    log "WARNING: qemu-nbd not found (apt-get install qemu-utils): the direct pair runs without its qemu-nbd reference"
    QEMU_NBD=0
fi

DROP="$(drop_caches_setting)"

# --- temp dir and cleanup ------------------------------------------------------
WORK="$(mktemp -d "$BENCH_DIR/nbd-mirror-bench.XXXXXX")"
RES="$WORK/results"
mkdir -p "$RES" "$WORK/run" "$WORK/data"
declare -A PID=() URI=()
SAMPLERS=()

stop_all() {
    local t pids=()
    kill_now "${SAMPLERS[@]}"
    SAMPLERS=()
    for t in "${!PID[@]}"; do pids+=("${PID[$t]}"); done
    stop_pids "${pids[@]}"
    PID=()
}

on_exit_cleanup "$WORK"
set_guest_halt_poll

private_binaries

# --- backing file ---------------------------------------------------------------
DATA="$WORK/data/md1.img"
FSTYPE="$(df --output=fstype "$WORK" | tail -1 | tr -d ' ')"
[[ "$FSTYPE" == tmpfs ]] && log "WARNING: $BENCH_DIR is tmpfs: the numbers will not reflect a disk"
log "writing the ${SIZE_MIB} MiB backing file $DATA ($FSTYPE)"
# Really written, not just fallocated: unwritten extents read back as zeros
# without touching the disk, which would flatter the read rows.
dd if=/dev/zero of="$DATA" bs=1M count="$SIZE_MIB" oflag=direct conv=fsync status=none

# --- servers ---------------------------------------------------------------------
start_nbdkit() { # tag [plugin args...]
    local tag="$1"; shift
    local sock="$WORK/run/$tag.sock"
    nbdkit -f -U "$sock" file "$DATA" "$@" >"$RES/$tag.log" 2>&1 &
    PID[$tag]=$!
    wait_for 10 "${PID[$tag]}" test -S "$sock" || { cat "$RES/$tag.log" >&2; die "nbdkit ($tag) did not create $sock"; }
    URI[$tag]="nbd+unix:///?socket=$sock"
    echo "nbdkit $(nbdkit --version | awk '{print $2}') file ${*:-(defaults)}" >"$RES/$tag.desc"
}

# The O_DIRECT reference server of the direct pair: qemu-nbd with the page
# cache bypassed (cache=none = O_DIRECT) and io_uring, i.e. the agent's own
# write contract (a reply after the device completed; for the agent except
# lone small writes, see write_behind in docs/config.md), in another server.
start_qemu_nbd() { # tag
    local tag="$1" sock="$WORK/run/$1.sock"
    qemu-nbd -f raw --cache=none --aio=io_uring --persistent --shared=4 -k "$sock" "$DATA" >"$RES/$tag.log" 2>&1 &
    PID[$tag]=$!
    wait_for 10 "${PID[$tag]}" test -S "$sock" || { cat "$RES/$tag.log" >&2; die "qemu-nbd ($tag) did not create $sock"; }
    URI[$tag]="nbd+unix:///?socket=$sock"
    echo "$(qemu-nbd --version | head -1 | awk '{print $1, $2}') --cache=none --aio=io_uring (O_DIRECT)" >"$RES/$tag.desc"
}

start_agent() { # tag engine direct_io
    local tag="$1" engine="$2" direct="$3"
    local dir="$WORK/$tag"
    mkdir -p "$dir/run" "$dir/data"
    standalone_config "$dir" bench "$SIZE_MIB" "$engine" "$direct" "$DATA"
    start_standalone "$tag" "$dir" "$AGENT_BIN" "$RES/$tag.log" "$RES/$tag.init" "PID[$tag]"
    "$MDCTRL_BIN" --config "$dir/cluster.toml" --node server1 status md1 --json >"$RES/$tag.status.json" 2>>"$RES/$tag.init" || true
    local eng
    eng=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("engine","?"))' "$RES/$tag.status.json" 2>/dev/null || echo "?")
    echo "mirror-agent engine=$engine direct_io=$direct (status: $eng)" >"$RES/$tag.desc"
    URI[$tag]="nbd+unix:///md1?socket=$dir/run/md1.nbd"
}

# VmRSS/VmHWM of a server every 0.1 s for its whole life (idle most of it;
# the peak is what the report uses).
start_sampler() { # tag
    local out="$RES/$1.rss" pid="${PID[$1]}"
    ( while kill -0 "$pid" 2>/dev/null; do
          grep -E '^(VmRSS|VmHWM)' "/proc/$pid/status" 2>/dev/null | tr '\n' ' '
          echo
          sleep 0.1
      done ) >"$out" &
    SAMPLERS+=($!)
}

# Wall clock, whole-machine CPU, the server's CPU ticks (process and threads).
snapshot() { # pid file
    {
        echo "wall $(date +%s.%N)"
        head -1 /proc/stat
        echo "proc $(cat "/proc/$1/stat" 2>/dev/null)"
        for t in /proc/"$1"/task/*; do
            echo "task $(cat "$t/stat" 2>/dev/null)"
        done
    } >"$2"
}

# --- fio jobs ---------------------------------------------------------------------
JOBS=( # name rw bs iodepth
    "seqwrite write 1M 8"
    "seqread read 1M 8"
    "randwrite randwrite 4k 32"
    "randread randread 4k 32"
    "lat1 randwrite 4k 1"
)
if [[ -n "${ONLY_JOBS:-}" ]]; then
    picked=()
    for j in "${JOBS[@]}"; do
        for o in $ONLY_JOBS; do [[ "${j%% *}" == "$o" ]] && picked+=("$j"); done
    done
    ((${#picked[@]})) || die "ONLY_JOBS '$ONLY_JOBS' matches no job (seqwrite seqread randwrite randread lat1)"
    JOBS=("${picked[@]}")
fi

run_fio() { # tag job rep rw bs qd
    local tag="$1" name="$2" rep="$3" rw="$4" bs="$5" qd="$6" extra=() target
    local f="$RES/$tag.$name.$rep"
    [[ "$name" == lat1 ]] && extra=(--lat_percentiles=1 --percentile_list=50:99:99.9)
    # Sequential jobs pass over the file at most once (ramp included): they end
    # after RUNTIME or at the end of the file, whichever comes first. Time-based,
    # a fast server would wrap around and re-read (or rewrite) what the page
    # cache still holds from its first pass, which is not what a slower one gets.
    # Random jobs stay time-based.
    case "$rw" in read|write) ;; *) extra+=(--time_based) ;; esac
    if [[ "$tag" == device ]]; then
        # No server: fio itself on the backing file, O_DIRECT through io_uring
        # (the agent's own path to the disk, without NBD in between).
        target=(--ioengine=io_uring --direct=1 --filename="$DATA")
    else
        target=(--ioengine=nbd --uri="${URI[$tag]}")
        kill -0 "${PID[$tag]}" 2>/dev/null || { cat "$RES/$tag.log" >&2; die "server $tag died"; }
    fi
    drop_caches
    [[ "$tag" == device ]] || snapshot "${PID[$tag]}" "$f.cpu0"
    # randrepeat=1 (fio's default seed): the same offsets for every server.
    fio --name="$name" "${target[@]}" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --numjobs=1 --runtime="$RUNTIME" \
        --ramp_time="$RAMP" --randrepeat=1 "${extra[@]}" \
        --output-format=json --output="$f.json" \
        >"$f.fio.log" 2>&1 || { cat "$f.fio.log" >&2; die "fio $name against $tag failed"; }
    [[ "$tag" == device ]] || snapshot "${PID[$tag]}" "$f.cpu1"
}

# All servers of a group run at once (idle unless driven); every job runs on
# each of them REPS times, the order reversed on every repetition, so slow
# drifts of the shared machine's load hit all servers alike.
run_group() { # tags...
    local tags=("$@") j name rw bs qd rep order t
    for t in "${tags[@]}"; do [[ "$t" == device ]] || start_sampler "$t"; done
    for j in "${JOBS[@]}"; do
        read -r name rw bs qd <<<"$j"
        for rep in $(seq "$REPS"); do
            if ((rep % 2)); then order=("${tags[@]}"); else order=(); for t in "${tags[@]}"; do order=("$t" "${order[@]}"); done; fi
            for t in "${order[@]}"; do run_fio "$t" "$name" "$rep" "$rw" "$bs" "$qd"; done
        done
        log "  $name done (${tags[*]})"
    done
    stop_all
}

START=$SECONDS
echo "$PAIRS" >"$RES/pairs"
echo "$REPS" >"$RES/reps"
echo "$RUNTIME" >"$RES/runtime"
for j in "${JOBS[@]}"; do echo "${j%% *}"; done >"$RES/jobs"
cached=() direct=0
for p in $PAIRS; do
    case "$p" in
        buffered) cached+=(agent-uring-buffered) ;;
        portable) cached+=(agent-portable) ;;
        direct) direct=1 ;;
    esac
done
if ((${#cached[@]})); then
    log "group: nbdkit (page cache) vs ${cached[*]}"
    start_nbdkit nbdkit
    for t in "${cached[@]}"; do
        case "$t" in
            agent-uring-buffered) start_agent "$t" io_uring off ;;
            agent-portable) start_agent "$t" portable off ;;
        esac
    done
    run_group nbdkit "${cached[@]}"
fi
if ((direct)); then
    log "group: nbdkit cache=none vs agent io_uring direct_io=on"
    start_nbdkit nbdkit-nocache cache=none
    start_agent agent-uring-direct io_uring on
    refs=()
    if [[ "$DIRECT_REFS" == 1 ]]; then
        ((QEMU_NBD)) && { start_qemu_nbd qemu-direct; refs+=(qemu-direct); }
        echo "fio $(fio --version | sed 's/^fio-//') on the backing file, ioengine=io_uring direct=1 (no server, no NBD)" >"$RES/device.desc"
        refs+=(device)
    fi
    echo "${refs[*]}" >"$RES/direct_refs"
    run_group nbdkit-nocache agent-uring-direct "${refs[@]}"
fi

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    machine_line
    echo "agent: $(basename "$AGENT_BIN") built $AGENT_BUILT (tree at $(tree_state))"
    echo "backing: ${SIZE_MIB} MiB file on $(df --output=source "$WORK" | tail -1) ($FSTYPE), written with dd before the run; page cache dropped before each job: $([[ $DROP == 1 ]] && echo yes || echo no)"
    echo "client: $(fio --version) ioengine=nbd (libnbd), 1 connection; each job ${RUNTIME}s measured after ${RAMP}s ramp, ${REPS} run(s) per server in alternating order; bench time $((SECONDS - START))s"
} >"$RES/meta"

python3 "$HERE/report.py" "$RES"
