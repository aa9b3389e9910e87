#!/bin/busybox sh
# vm-harness guest /init: mounts, modules, watchdog, then /scenario.sh.
# Serial ports: ttyS0 console (host: console.log), ttyS1 agent log, ttyS2 helper log, ttyS3 dmesg at the end.
# Protocol on the console: "VMH-RESULT PASS|FAIL <reason>" once; "VMH <uptime> <text>" progress lines.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/root
t() { echo "VMH $(cut -d' ' -f1 /proc/uptime) $*"; }
finish() {
  dmesg > /dev/ttyS3 2>/dev/null
  sync
  poweroff -f
}
pass() { t "verdict"; echo "VMH-RESULT PASS $*"; finish; }
fail() { t "verdict"; echo "VMH-RESULT FAIL $*"; t "dmesg tail:"; dmesg | tail -20; finish; }

WD=240
for a in $(cat /proc/cmdline); do
  case "$a" in
    vmh.wd=*) WD=${a#vmh.wd=};;
  esac
done
t "init: kernel $(uname -r), watchdog ${WD}s"
# A dead NBD link can leave tasks in D state forever: the watchdog reports and powers off.
(sleep "$WD"; echo "VMH-RESULT FAIL guest watchdog fired after ${WD}s"; echo w > /proc/sysrq-trigger; sleep 1; dmesg > /dev/ttyS3; poweroff -f) &

while read -r m; do
  insmod "/lib/modules/$m" || t "insmod $m failed"
done < /lib/modules/load-order
hostname nodea
ip link set lo up
t "modules loaded: $(wc -l < /lib/modules/load-order)"

. /scenario.sh
fail "scenario script returned without a result"
