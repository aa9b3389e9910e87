# failover, node A (nodea) in the guest; node B (nodeb) is a mirror-agent on the host.
# vmh.phase=1: init --blank, connect, activate (attach /dev/nbd0, mkfs, mount), then write
#   files forever, printing "VMH-ACK name sha256" once each is fsynced; the host kills QEMU.
# vmh.phase=2: same disks; the agent reconnects, B -> A resync; once in sync and B
#   inactive: activate, verify /etc/vmh/expected, deactivate, e2fsck -fn the backing disk.
start_agent
if [ "$PHASE" = 1 ]; then
  activate_fresh
  i=0
  while :; do
    i=$((i+1))
    write_file $i
    [ $i -ge 400 ] && fail "the host did not kill the guest after 400 acked files"
  done
fi

# Phase 2: A returns after its power loss.
$WS --until connected --timeout 120 > /tmp/ws.out 2>&1 || fail "A did not reconnect to B: $(tail -2 /tmp/ws.out)"
cat /tmp/ws.out
$WS --until connected,in-sync,recovery-finished --timeout 300 > /tmp/ws.out 2>&1 || fail "A not in sync after the resync: $(tail -2 /tmp/ws.out)"
cat /tmp/ws.out
t "MARK-A-IN-SYNC"
ls -l /run/md/divergent 2>/dev/null | tail -n +2 | while read -r l; do t "saved divergent: $l"; done
$WS --until connected,in-sync,peer-inactive --timeout 300 > /tmp/ws.out 2>&1 || fail "B did not deactivate: $(tail -2 /tmp/ws.out)"
t "$(tail -1 /tmp/ws.out)"
$MD activate md1 > /tmp/act.out 2>&1 || fail "mdctrl activate md1 on A after failback: $(tail -3 /tmp/act.out)"
grep -q "^/dev/nbd0 /mnt/md1 ext4" /proc/mounts || fail "activate did not mount /dev/nbd0 on /mnt/md1"
N=$(wc -l < /etc/vmh/expected)
[ "$N" -gt 0 ] || fail "no expected files handed to the guest"
echo 3 > /proc/sys/vm/drop_caches
(cd /mnt/md1 && sha256sum -c /etc/vmh/expected > /tmp/sum.out 2>&1) || fail "acked files on A after failback: $(grep -v ': OK' /tmp/sum.out | head -3 | tr '\n' ' ')"
t "all $N acked files verified on A"
echo back > /mnt/md1/failback || fail "write after failback"
sync
$MD deactivate md1 > /tmp/deact.out 2>&1 || fail "mdctrl deactivate md1 on A: $(tail -3 /tmp/deact.out)"
$MD status md1 > /dev/ttyS1 2>&1
kill -TERM $AGENT; wait $AGENT; rc=$?
[ $rc = 0 ] || fail "A's agent exit rc=$rc"
e2fsck -fn /dev/vda > /tmp/fsck.out 2>&1 || fail "e2fsck -fn /dev/vda on A: $(tail -3 /tmp/fsck.out)"
dmesg | grep -iE "I/O error|EXT4-fs error" > /tmp/errs && fail "kernel reported errors: $(head -3 /tmp/errs)"
pass "A: reconnected, resynced from B, activated after B, $N acked files verified, e2fsck -fn clean"
