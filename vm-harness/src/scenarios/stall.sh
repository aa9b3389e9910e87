# stall: the active mirror-agent itself (serving /dev/nbd0 through `mdctrl
# activate`) is SIGSTOPped for STALL seconds (less than the kernel timeout)
# during a write stream, then resumed: no I/O error, data intact.
# Sourced by /init (t, pass, fail defined there).
C=/etc/nbd-mirror/cluster.toml
MD="mdctrl --config $C --node nodea"
TIMEOUT=30   # the agent's attach timeout (kernel::AttachOptions default)
STALL=12
for a in $(cat /proc/cmdline); do
  case "$a" in
    vmh.stall=*) STALL=${a#vmh.stall=};;
  esac
done

$MD init md1 > /tmp/init.out 2>&1 || fail "mdctrl init md1: $(tail -3 /tmp/init.out)"
mirror-agent --config $C --node nodea > /dev/ttyS1 2>&1 &
S=$!
i=0
until $MD ping > /dev/null 2>&1; do
  kill -0 $S 2>/dev/null || fail "mirror-agent exited before answering ping (see agent.log)"
  i=$((i+1)); [ $i -gt 600 ] && fail "mirror-agent did not answer ping within 60 s"
  sleep 0.1
done
# A blank volume: attach without mount, make the file system, then mount it.
$MD activate md1 --nomount > /tmp/act.out 2>&1 || fail "mdctrl activate md1 --nomount: $(tail -3 /tmp/act.out)"
[ "$(cat /sys/block/nbd0/size)" != 0 ] || fail "activate did not attach /dev/nbd0"
t "agent (pid $S) attached /dev/nbd0"
mkfs.ext4 -q -F /dev/nbd0 || fail "mkfs.ext4"
mkdir -p /mnt/md1
mount -t ext4 /dev/nbd0 /mnt/md1 || fail "mount"

# Writer: 24 files of 2 MiB, each fsynced; records failures.
(
  i=0
  while [ $i -lt 24 ]; do
    dd if=/dev/urandom of=/mnt/md1/w$i bs=1M count=2 conv=fsync 2>/dev/null || echo "w$i" >> /tmp/werr
    i=$((i+1))
  done
  echo done > /tmp/wdone
) &
W=$!
# Stop the agent once the stream is under way (the third file begun), not
# after a fixed time: on a fast host the 48 MiB can be written in 2 s.
i=0
until [ -e /mnt/md1/w2 ]; do
  [ -f /tmp/wdone ] && fail "the writer finished before the agent could be stopped"
  i=$((i+1)); [ $i -gt 600 ] && fail "the writer did not reach its third file within 60 s"
  sleep 0.1
done
t "STEP SIGSTOP mirror-agent for ${STALL}s (kernel timeout ${TIMEOUT}s)"
kill -STOP $S
T0=$(cut -d. -f1 /proc/uptime)
sleep "$STALL"
[ -f /tmp/wdone ] && { kill -CONT $S; fail "the writer finished during the stall: nothing was stalled"; }
kill -CONT $S
t "STEP SIGCONT after $(( $(cut -d. -f1 /proc/uptime) - T0 ))s"
wait $W
[ -s /tmp/werr ] && fail "writes failed during/after the stall: $(cat /tmp/werr | tr '\n' ' ')"
[ -f /tmp/wdone ] || fail "writer did not finish"
(cd /mnt/md1 && sha256sum w* > /tmp/sums) || fail "read back after stall"
echo 3 > /proc/sys/vm/drop_caches
(cd /mnt/md1 && sha256sum -c /tmp/sums > /tmp/sumc 2>&1) || fail "checksums differ after drop_caches: $(tail -2 /tmp/sumc)"
umount /mnt/md1 || fail "umount"
$MD deactivate md1 > /tmp/deact.out 2>&1 || fail "mdctrl deactivate md1: $(tail -3 /tmp/deact.out)"
[ "$(cat /sys/block/nbd0/size)" = 0 ] || fail "nbd0 still attached after deactivate"
kill -TERM $S; wait $S; rc=$?
[ $rc = 0 ] || fail "mirror-agent exit rc=$rc (see agent.log)"
e2fsck -fn /dev/vda > /tmp/fsck.out 2>&1 || fail "e2fsck -fn /dev/vda: $(tail -3 /tmp/fsck.out)"
dmesg | grep -iE "I/O error|EXT4-fs error|EXT4-fs warning|Aborting journal" > /tmp/errs && fail "kernel reported: $(head -3 /tmp/errs | tr '\n' ' ')"
RECONN=$(dmesg | grep -c "reconnected socket")
TIMEDOUT=$(dmesg | grep -c "timed out")
pass "mirror-agent stopped ${STALL}s (kernel timeout ${TIMEOUT}s) during fsync writes: no I/O error, 24 files intact, e2fsck clean; kernel timeouts logged: $TIMEDOUT, re-attached: $RECONN"
