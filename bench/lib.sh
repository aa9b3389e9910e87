# Shared helpers of the bench scripts (run.sh, mirror.sh, ringpair.sh, resync.sh,
# seqread-ab.sh); sourced,
# never run. The sourcing script sets BENCH_NAME (log prefix) first, and
# later WORK, RES, DROP, AGENT_BIN and MDCTRL_BIN where a helper uses them.

log() { echo "$BENCH_NAME: $*" >&2; }
die() { echo "$BENCH_NAME: $*" >&2; exit 1; }

# DROP_CACHES=0|1|auto (default auto: drop when root can write drop_caches).
drop_caches_setting() {
    local d="${DROP_CACHES:-auto}"
    if [[ "$d" == auto ]]; then
        if [[ -w /proc/sys/vm/drop_caches ]]; then d=1; else d=0; fi
    fi
    echo "$d"
}

# Writes dirty pages back and, when DROP=1, drops the page cache.
drop_caches() {
    sync
    if [[ "$DROP" == 1 ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
}

# Stops processes: SIGTERM to all, up to 10 s each to exit, then SIGKILL.
stop_pids() { # pid...
    local p
    for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "$@"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}

# Stops samplers and other helpers at once (no grace period).
kill_now() { # pid...
    local p
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

# Copies the raw results to OUT when set (called from the EXIT trap).
keep_results() {
    if [[ -n "${OUT:-}" && -d "${RES:-}" ]]; then
        mkdir -p "$OUT" && cp -r "$RES"/. "$OUT"/ && log "raw results kept in $OUT"
    fi
}

# Installs the EXIT trap of the bench scripts: stop the servers (the script's
# own stop_all), keep the raw results (OUT, where the script has a RES), remove
# the given work directories, and keep the exit status; INT/TERM exit through
# it too.
on_exit_cleanup() { # dir...
    CLEANUP_DIRS=("$@")
    trap _exit_cleanup EXIT
    trap 'exit 130' INT TERM
}
_exit_cleanup() {
    local rc=$?
    stop_all
    restore_guest_halt_poll
    keep_results
    rm -rf "${CLEANUP_DIRS[@]}"
    exit "$rc"
}

# Guest halt polling (the cpuidle-haltpoll driver of a KVM guest): how long an
# idle vCPU polls before it halts. Waking a thread on a halted vCPU costs
# tens of µs on a VM (bench/README.md, "Guest halt polling").
# GUEST_HALT_POLL_NS=N sets it for the run (root) and restores the machine's
# value on exit; unset leaves the machine as it is. Call after on_exit_cleanup.
HALTPOLL_PARAM=/sys/module/haltpoll/parameters/guest_halt_poll_ns
HALTPOLL_ORIG=""
set_guest_halt_poll() {
    [[ -n "${GUEST_HALT_POLL_NS:-}" ]] || return 0
    [[ "$GUEST_HALT_POLL_NS" =~ ^[0-9]+$ ]] || die "GUEST_HALT_POLL_NS must be a number of nanoseconds"
    [[ -w "$HALTPOLL_PARAM" ]] \
        || die "GUEST_HALT_POLL_NS needs root and the cpuidle-haltpoll driver ($HALTPOLL_PARAM)"
    [[ "$(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null)" == haltpoll ]] \
        || log "WARNING: the cpuidle driver is not haltpoll: GUEST_HALT_POLL_NS changes nothing"
    HALTPOLL_ORIG="$(cat "$HALTPOLL_PARAM")"
    echo "$GUEST_HALT_POLL_NS" >"$HALTPOLL_PARAM"
    log "guest halt polling set to $GUEST_HALT_POLL_NS ns for this run (the machine's setting: $HALTPOLL_ORIG ns)"
}
restore_guest_halt_poll() {
    [[ -n "$HALTPOLL_ORIG" ]] || return 0
    echo "$HALTPOLL_ORIG" >"$HALTPOLL_PARAM" || log "WARNING: could not restore $HALTPOLL_PARAM to $HALTPOLL_ORIG"
    HALTPOLL_ORIG=""
}

# The report's "machine:" line.
machine_line() {
    local hp="no cpuidle-haltpoll driver"
    if [[ -r "$HALTPOLL_PARAM" ]]; then
        hp="guest halt polling $(cat "$HALTPOLL_PARAM") ns"
        if [[ -n "$HALTPOLL_ORIG" ]]; then
            hp+=" (set for this run; the machine's setting: $HALTPOLL_ORIG ns)"
        else
            hp+=" (the machine's setting)"
        fi
    fi
    echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/^Mem:/{print $2}') GiB RAM, kernel $(uname -r), $hp, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
}

# Polls until a condition holds; fails early if the process died.
wait_for() { # timeout_s pid command...
    local t="$1" pid="$2"; shift 2
    local deadline=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.05
    done
}

# Private copies: a rebuild of the shared target dir during the run must not
# swap binaries between the servers of one comparison. Sets AGENT_BUILT.
private_binaries() {
    AGENT_BUILT="$(date -u -r "$AGENT_BIN" '+%Y-%m-%d %H:%M UTC')"
    cp "$AGENT_BIN" "$WORK/mirror-agent"; cp "$MDCTRL_BIN" "$WORK/mdctrl"
    AGENT_BIN="$WORK/mirror-agent"; MDCTRL_BIN="$WORK/mdctrl"
}

# n distinct TCP ports on 127.0.0.1, each checked free by binding it, from 5000-8999: below
# the kernel's ephemeral range (32768 and up), so that no outgoing connection (a running
# pair's dialer) takes one as its source port before the agent binds it. The next port to
# try is kept in a file, so that calls made before the previous pair has bound its ports
# never return the same ones (a port from bind(0) is an ephemeral one and could).
free_ports() { # n
    python3 - "$1" "${BENCH_PORT_FILE:-/tmp/nbdm-bench-next-port}" <<'PY'
import socket, sys
n, state = int(sys.argv[1]), sys.argv[2]
lo, hi = 5000, 9000
try:
    nxt = int(open(state).read())
except (OSError, ValueError):
    nxt = lo
socks, p = [], nxt if lo <= nxt < hi else lo
for _ in range(hi - lo):
    if len(socks) == n:
        break
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        socks.append(s)
    except OSError:
        s.close()
    p = p + 1 if p + 1 < hi else lo
if len(socks) < n:
    sys.exit(f"free_ports: fewer than {n} free TCP ports on 127.0.0.1 in {lo}-{hi - 1}")
open(state, "w").write(str(p))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Writes DIR/cluster.toml for a standalone agent (node server1, resource md1,
# admin socket DIR/run/server1.sock, NBD socket DIR/run/md1.nbd) serving DATA.
standalone_config() { # dir cluster_name size_mib engine direct_io data
    local dir="$1" cluster="$2" size="$3" engine="$4" direct="$5" data="$6" port
    # Unused by a standalone node, but must be valid: take a free one.
    port=$(free_ports 1)
    cat >"$dir/cluster.toml" <<EOF
[cluster]
name = "$cluster"

[[server]]
name = "server1"
address = "127.0.0.1"
control_port = $port
admin_socket = "$dir/run/server1.sock"

[[resource]]
name = "md1"
size = "${size}MiB"
engine = "$engine"
direct_io = "$direct"

[resource.server.server1]
data_path = "$data"
cluster_partition = "$dir/data/md1.cp"
nbd_socket = "$dir/run/md1.nbd"
EOF
}

# Initialises (`mdctrl init`), starts and activates the standalone agent of
# DIR/cluster.toml (see standalone_config) with binary BIN, and waits for its
# NBD socket. The agent's output goes to LOG, mdctrl's to INIT; its PID is
# stored into the variable named PIDVAR (e.g. "PID[$tag]") as soon as it
# runs, so that the caller's cleanup stops it even when a later step fails.
# VAR=VALUE arguments go to the agent's environment (RUST_LOG defaults to info).
# The agent has AGENT_START_TIMEOUT seconds (default 20) to open its admin socket.
start_standalone() { # tag dir bin log init pidvar [VAR=VALUE...]
    local tag="$1" dir="$2" bin="$3" log="$4" init="$5" pidvar="$6"; shift 6
    local ctl=("$MDCTRL_BIN" --config "$dir/cluster.toml" --node server1) pid
    "${ctl[@]}" init md1 >"$init" 2>&1 || { cat "$init" >&2; die "mdctrl init ($tag) failed"; }
    env RUST_LOG="${RUST_LOG:-info}" "$@" "$bin" --config "$dir/cluster.toml" --node server1 >"$log" 2>&1 &
    pid=$!
    printf -v "$pidvar" '%s' "$pid"
    wait_for "${AGENT_START_TIMEOUT:-20}" "$pid" test -S "$dir/run/server1.sock" || { cat "$log" >&2; die "agent ($tag) did not start"; }
    "${ctl[@]}" activate md1 --nomount >>"$init" 2>&1 || { cat "$init" "$log" >&2; die "mdctrl activate ($tag) failed"; }
    wait_for 10 "$pid" test -S "$dir/run/md1.nbd" || die "agent ($tag) did not create its NBD socket"
}

# "git REV", plus " + uncommitted changes" when the work tree differs from it
# (the report's "agent" line; "?" outside a git checkout).
tree_state() {
    local rev
    rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) || { echo "?"; return; }
    if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        echo "git $rev + uncommitted changes"
    else
        echo "git $rev"
    fi
}

# Checks tools (never installs them): each argument is TOOL or TOOL:PACKAGE.
require_tools() {
    local a missing=() pkgs=()
    for a in "$@"; do
        command -v "${a%%:*}" >/dev/null && continue
        missing+=("${a%%:*}"); pkgs+=("${a#*:}")
    done
    if ((${#missing[@]})); then
        die "missing: ${missing[*]}; install with: apt-get install ${pkgs[*]}"
    fi
    if [[ " $* " == *" fio "* ]]; then
        fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine (fio >= 3.19 built with libnbd); apt-get install fio"
    fi
    if [[ " $* " == *" nbdkit "* ]]; then
        nbdkit file --dump-plugin >/dev/null 2>&1 || die "nbdkit has no file plugin; apt-get install nbdkit"
    fi
    local b
    # The agent's binaries, for the scripts that run it (ringpair.sh does not).
    for b in ${AGENT_BIN:+"$AGENT_BIN"} ${MDCTRL_BIN:+"$MDCTRL_BIN"}; do
        [[ -x "$b" ]] || die "$b not found; build with: cargo build --release -p mirror-agent -p cli --bins"
    done
    [[ -d "$BENCH_DIR" ]] || die "BENCH_DIR $BENCH_DIR does not exist"
}
