# Two-node scenarios, node A's common part (prepended to failover.sh / partition.sh):
# network (slirp: guest 10.0.2.15, host 10.0.2.2), agent start, fresh activation.
# Sourced by /init (t, pass, fail defined there).
C=/etc/nbd-mirror/cluster.toml
MD="mdctrl --config $C --node nodea"
WS="vm-harness guest wait-status --config $C --node nodea --resource md1"
PHASE=1
for a in $(cat /proc/cmdline); do
  case "$a" in
    vmh.phase=*) PHASE=${a#vmh.phase=};;
  esac
done
hostname nodea
ip link set eth0 up || fail "no eth0 (virtio_net)"
ip addr add 10.0.2.15/24 dev eth0 || fail "ip addr add"
ip route add default via 10.0.2.2 || fail "ip route add"
t "network: $(ip -o -4 addr show eth0 | awk '{print $4}')"

# start_agent: (phase 1: mdctrl init --blank first) mirror-agent on ttyS1, wait for ping; sets AGENT.
start_agent() {
  if [ "$PHASE" = 1 ]; then
    $MD init md1 --blank > /tmp/init.out 2>&1 || fail "mdctrl init md1 --blank: $(tail -3 /tmp/init.out)"
  fi
  mirror-agent --config $C --node nodea > /dev/ttyS1 2>&1 &
  AGENT=$!
  i=0
  until $MD ping > /dev/null 2>&1; do
    kill -0 $AGENT 2>/dev/null || fail "mirror-agent exited before answering ping (see agent log)"
    i=$((i+1)); [ $i -gt 600 ] && fail "mirror-agent did not answer ping within 60 s"
    sleep 0.1
  done
  t "agent answers ping (phase $PHASE)"
}

# activate_fresh: wait for the in-sync blank pair, then attach only, mkfs through
# /dev/nbd0 (replicated to B), deactivate, and activate as an operator does
# (the agent attaches, fscks and mounts). Prints MARK-A-ACTIVE.
activate_fresh() {
  $WS --until connected,in-sync --timeout 120 > /tmp/ws.out 2>&1 || fail "A not connected/in sync with B: $(tail -2 /tmp/ws.out)"
  t "$(tail -1 /tmp/ws.out)"
  $MD activate md1 --nomount > /tmp/act.out 2>&1 || fail "mdctrl activate md1 --nomount: $(tail -3 /tmp/act.out)"
  [ "$(cat /sys/block/nbd0/size)" != 0 ] || fail "activate --nomount did not attach /dev/nbd0"
  mkfs.ext4 -q -F /dev/nbd0 > /tmp/mkfs.out 2>&1 || fail "mkfs.ext4 /dev/nbd0: $(tail -2 /tmp/mkfs.out)"
  $MD deactivate md1 > /tmp/deact.out 2>&1 || fail "mdctrl deactivate md1: $(tail -3 /tmp/deact.out)"
  $MD activate md1 > /tmp/act.out 2>&1 || fail "mdctrl activate md1: $(tail -3 /tmp/act.out)"
  grep -q "^/dev/nbd0 /mnt/md1 ext4" /proc/mounts || fail "activate did not mount /dev/nbd0 on /mnt/md1"
  t "MARK-A-ACTIVE $($MD status md1 --json | grep -c '"replicating": true') replicating"
}

# write_file N: one file of 256 KiB..1 MiB from urandom, fsync + sync, then "VMH-ACK name sha256".
write_file() {
  f=$(printf 'f%04d' $1)
  head -c $((256 * 1024 * (1 + $1 % 4))) /dev/urandom > /tmp/src || fail "urandom"
  sha=$(sha256sum /tmp/src | cut -d' ' -f1)
  dd if=/tmp/src of=/mnt/md1/$f bs=64k conv=fsync 2>/dev/null || fail "write $f"
  sync
  echo "VMH-ACK $f $sha"
}
