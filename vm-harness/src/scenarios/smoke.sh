# smoke: one guest, standalone config, /dev/nbd0 end to end through mirror_agent::kernel.
# Sourced by /init (t, pass, fail defined there).
C=/etc/nbd-mirror/cluster.toml
N=nodea
MD="mdctrl --config $C --node $N"

t "STEP mdctrl init md1"
$MD init md1 > /tmp/init.out 2>&1 || fail "mdctrl init md1: $(tail -3 /tmp/init.out)"

t "STEP mirror-agent start"
mirror-agent --config $C --node $N > /dev/ttyS1 2>&1 &
AGENT=$!
i=0
until $MD ping > /dev/null 2>&1; do
  kill -0 $AGENT 2>/dev/null || fail "mirror-agent exited before answering ping (see agent.log)"
  i=$((i+1)); [ $i -gt 600 ] && fail "mirror-agent did not answer ping within 60 s"
  sleep 0.1
done
t "agent answers ping"
$MD status md1 || fail "mdctrl status md1"

t "STEP mdctrl activate md1 (agent path)"
# A blank volume has no file system: activate --nomount attaches /dev/nbd0 only,
# mkfs through it, deactivate (detach), then activate does fsck + mount itself.
AGENT_PATH=no
$MD activate md1 --nomount > /tmp/act.out 2>&1 || fail "mdctrl activate md1 --nomount: $(tail -3 /tmp/act.out)"
[ "$(cat /sys/block/nbd0/size)" != 0 ] || fail "activate --nomount did not attach /dev/nbd0 (size 0)"
grep -q " /mnt/md1 " /proc/mounts && fail "activate --nomount mounted /mnt/md1"
mkfs.ext4 -q -F /dev/nbd0 > /tmp/mkfs.out 2>&1 || fail "mkfs.ext4 /dev/nbd0 (agent's attach): $(tail -2 /tmp/mkfs.out)"
$MD deactivate md1 > /tmp/deact.out 2>&1 || fail "mdctrl deactivate md1 (nomount): $(tail -3 /tmp/deact.out)"
[ "$(cat /sys/block/nbd0/size)" = 0 ] || fail "nbd0 still attached after deactivate (nomount)"
$MD activate md1 > /tmp/act.out 2>&1 || fail "mdctrl activate md1 (fsck + mount): $(tail -3 /tmp/act.out)"
[ "$(cat /sys/block/nbd0/size)" != 0 ] || fail "activate did not attach /dev/nbd0"
grep -q "^/dev/nbd0 /mnt/md1 ext4" /proc/mounts || fail "activate did not mount /dev/nbd0 on /mnt/md1: $(grep md1 /proc/mounts)"
t "agent attached /dev/nbd0 and mounted /mnt/md1"
dd if=/dev/urandom of=/mnt/md1/agent-path bs=1M count=4 conv=fsync 2>/dev/null || fail "write through the agent's mount"
W=$($MD status md1 --json | grep '"written_bytes"' | tr -dc 0-9)
[ "${W:-0}" -ge 4194304 ] || fail "agent's NBD counters show ${W:-?} bytes written, expected >= 4 MiB through /dev/nbd0"
(cd /mnt/md1 && exec sleep 600) &
HOLD=$!
i=0; until [ "$(readlink /proc/$HOLD/cwd)" = /mnt/md1 ]; do i=$((i+1)); [ $i -gt 300 ] && fail "holder never entered /mnt/md1"; sleep 0.05; done
$MD deactivate md1 > /tmp/deact.out 2>&1 && fail "mdctrl deactivate md1 succeeded while pid $HOLD uses /mnt/md1"
grep -q "$HOLD" /tmp/deact.out || fail "busy deactivate refusal does not name pid $HOLD: $(tail -2 /tmp/deact.out)"
grep -q " /mnt/md1 " /proc/mounts || fail "busy deactivate unmounted anyway"
t "mdctrl deactivate refused while busy: $(head -1 /tmp/deact.out | cut -c1-150)"
kill $HOLD; wait $HOLD 2>/dev/null
$MD deactivate md1 > /tmp/deact.out 2>&1 || fail "mdctrl deactivate md1: $(tail -3 /tmp/deact.out)"
grep -q " /mnt/md1 " /proc/mounts && fail "still mounted after deactivate"
[ "$(cat /sys/block/nbd0/size)" = 0 ] || fail "nbd0 still attached after deactivate"
AGENT_PATH=yes
t "STEP mirror-agent stop"
kill -TERM $AGENT; wait $AGENT; t "agent exited rc=$?"

t "STEP helper kernel-smoke"
vm-harness guest kernel-smoke > /tmp/ks.out 2>/dev/ttyS2; rc=$?
cat /tmp/ks.out
[ $rc = 0 ] || fail "kernel-smoke rc=$rc: $(grep -v '^STEP' /tmp/ks.out | tail -2 | tr '\n' ' ') (helper.log has the error)"
grep -q "KERNEL-SMOKE OK" /tmp/ks.out || fail "kernel-smoke did not finish"

t "STEP agent restart: serve --mount (activate_device), kill -9, re-attach with NBD_CMD_RECONFIGURE"
rm -f /tmp/ready1 /tmp/ready2
vm-harness guest serve --mount --ready /tmp/ready1 2>/dev/ttyS2 > /tmp/serve1.out &
S1=$!
i=0; until [ -s /tmp/ready1 ]; do kill -0 $S1 2>/dev/null || fail "serve #1 exited: $(tail -2 /tmp/serve1.out)"; i=$((i+1)); [ $i -gt 600 ] && fail "serve #1 not ready"; sleep 0.1; done
grep -q "netlink reconfigured=false" /tmp/ready1 || fail "serve #1: $(cat /tmp/ready1)"
grep -q "^/dev/nbd0 /mnt/md1 ext4" /proc/mounts || fail "activate_device did not mount /mnt/md1: $(grep md1 /proc/mounts)"
(cd /mnt/md1 && sha256sum -c SUMS > /tmp/sum1 2>&1) || fail "checksums via serve #1: $(tail -2 /tmp/sum1)"
kill -9 $S1; wait $S1 2>/dev/null
t "serve #1 killed; nbd0 size $(cat /sys/block/nbd0/size)"
vm-harness guest serve --mount --ready /tmp/ready2 2>/dev/ttyS2 > /tmp/serve2.out &
S2=$!
i=0; until [ -s /tmp/ready2 ]; do kill -0 $S2 2>/dev/null || fail "serve #2 exited: $(tail -2 /tmp/serve2.out)"; i=$((i+1)); [ $i -gt 600 ] && fail "serve #2 not ready"; sleep 0.1; done
grep -q "netlink reconfigured=true" /tmp/ready2 || fail "serve #2 did not re-attach with RECONFIGURE: $(cat /tmp/ready2)"
[ "$(grep -c ' /mnt/md1 ' /proc/mounts)" = 1 ] || fail "after re-attach /mnt/md1 is not mounted exactly once: $(grep md1 /proc/mounts)"
echo 3 > /proc/sys/vm/drop_caches
(cd /mnt/md1 && sha256sum -c SUMS > /tmp/sum2 2>&1) || fail "checksums after re-attach: $(tail -2 /tmp/sum2)"
dd if=/dev/urandom of=/mnt/md1/after-restart bs=1M count=4 conv=fsync 2>/dev/null || fail "write after re-attach"
(cd /mnt/md1 && exec sleep 600) &
HOLD=$!
i=0; until [ "$(readlink /proc/$HOLD/cwd)" = /mnt/md1 ]; do i=$((i+1)); [ $i -gt 300 ] && fail "holder never entered /mnt/md1"; sleep 0.05; done
kill -TERM $S2
i=0; until grep -q "deactivate refused" /tmp/serve2.out 2>/dev/null; do kill -0 $S2 2>/dev/null || fail "serve #2 exited instead of refusing: $(tail -2 /tmp/serve2.out)"; i=$((i+1)); [ $i -gt 300 ] && fail "no refusal from serve #2"; sleep 0.1; done
grep "deactivate refused" /tmp/serve2.out | grep -q "pid $HOLD (" || fail "busy refusal does not name pid $HOLD: $(grep refused /tmp/serve2.out)"
grep -q " /mnt/md1 " /proc/mounts || fail "busy deactivate unmounted anyway"
t "deactivate refused while busy: $(grep refused /tmp/serve2.out | cut -c1-150)"
kill $HOLD; wait $HOLD 2>/dev/null
kill -TERM $S2; wait $S2; rc=$?
[ $rc = 0 ] || fail "serve #2 exit rc=$rc: $(tail -2 /tmp/serve2.out)"
grep -q " /mnt/md1 " /proc/mounts && fail "still mounted after deactivate_device"
[ "$(cat /sys/block/nbd0/size)" = 0 ] || fail "nbd0 still attached after deactivate_device"
t "STEP foreign disconnect (nbd-client -d) is not revived by the re-attach supervisor"
vm-harness guest serve --ready /tmp/ready4 2>/tmp/serve4.err > /tmp/serve4.out &
S4=$!
i=0; until [ -s /tmp/ready4 ]; do kill -0 $S4 2>/dev/null || fail "serve #4 exited: $(tail -2 /tmp/serve4.out)"; i=$((i+1)); [ $i -gt 600 ] && fail "serve #4 not ready"; sleep 0.1; done
nbd-client -d /dev/nbd0 > /dev/null 2>&1 || fail "nbd-client -d /dev/nbd0"
i=0; until grep -q "not re-attaching" /tmp/serve4.err; do i=$((i+1)); [ $i -gt 300 ] && fail "supervisor did not notice the foreign disconnect: $(tail -2 /tmp/serve4.err)"; sleep 0.1; done
[ "$(cat /sys/block/nbd0/size)" = 0 ] || fail "nbd0 was revived after a foreign disconnect"
kill -TERM $S4; wait $S4; rc=$?
cat /tmp/serve4.err > /dev/ttyS2
[ $rc = 0 ] || fail "serve #4 exit rc=$rc after a foreign disconnect: $(tail -2 /tmp/serve4.out)"
e2fsck -fn /dev/vda > /tmp/fsck.out 2>&1 || fail "e2fsck -fn /dev/vda after restart test: $(tail -3 /tmp/fsck.out)"
dmesg | grep -iE "I/O error|EXT4-fs error" > /tmp/errs && fail "kernel reported errors: $(head -3 /tmp/errs)"
pass "nbd0 via netlink: mkfs/mount/write/busy-umount/detach/e2fsck/re-attach/verify, nbd-client fallback, restart+RECONFIGURE keeping the mount, busy deactivate refused, foreign disconnect respected (agent activation path: $AGENT_PATH)"
