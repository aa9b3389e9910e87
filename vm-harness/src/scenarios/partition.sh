# partition, node A (nodea) in the guest; node B on the host behind the harness's fault proxy.
# A activates and writes files in the background ("VMH-ACK name sha256" each, fsynced);
# the host cuts the link (blackhole), A must keep acknowledging writes alone, the host
# heals it, auto recovery resyncs A -> B; after in sync A writes a few more files
# (replicated again), stops, deactivates, e2fsck -fn of the backing disk.
start_agent
activate_fresh
rm -f /tmp/stop
( i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); write_file $i; echo $i > /tmp/count; [ $i -ge 2000 ] && break; done ) &
WRITER=$!
$WS --until disconnected --timeout 240 > /tmp/ws.out 2>&1 || fail "A never saw the link break: $(tail -2 /tmp/ws.out)"
t "MARK-A-SAW-BREAK after $(cat /tmp/count 2>/dev/null) files: $(tail -1 /tmp/ws.out)"
$WS --until connected,in-sync,recovery-finished --timeout 300 > /tmp/ws.out 2>&1 || fail "A not in sync again after heal: $(tail -2 /tmp/ws.out)"
cat /tmp/ws.out
N0=$(cat /tmp/count)
t "MARK-A-RECOVERED after $N0 files"
i=0; until [ "$(cat /tmp/count)" -ge $((N0 + 4)) ]; do kill -0 $WRITER 2>/dev/null || fail "writer stopped"; i=$((i+1)); [ $i -gt 1200 ] && fail "no writes after recovery"; sleep 0.1; done
touch /tmp/stop; wait $WRITER
$MD status md1 --json | grep -q '"replicating": true' || fail "A not replicating after recovery: $($MD status md1 | head -5 | tr '\n' ' ')"
N=$(cat /tmp/count)
$MD deactivate md1 > /tmp/deact.out 2>&1 || fail "mdctrl deactivate md1 on A: $(tail -3 /tmp/deact.out)"
$MD status md1 > /dev/ttyS1 2>&1
kill -TERM $AGENT; wait $AGENT; rc=$?
[ $rc = 0 ] || fail "A's agent exit rc=$rc"
e2fsck -fn /dev/vda > /tmp/fsck.out 2>&1 || fail "e2fsck -fn /dev/vda on A: $(tail -3 /tmp/fsck.out)"
dmesg | grep -iE "I/O error|EXT4-fs error" > /tmp/errs && fail "kernel reported errors: $(head -3 /tmp/errs)"
pass "A: $N files written through the cut and heal, recovered to in sync, e2fsck -fn clean"
