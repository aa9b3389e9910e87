#!/usr/bin/env bash
# Runs the whole nbd-mirror test suite on a fresh Debian 12 machine.
# Installs what the tests need first (idempotent: only what is missing), then
# runs `cargo test --workspace --release`. `.ci/run` calls exactly this script.
set -euo pipefail
cd "$(dirname "$0")"

# Tools the integration tests drive as real NBD clients / filesystem tools.
# binary -> Debian package
declare -A NEED=(
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=libnbd-bin
  [nbdkit]=nbdkit [fio]=fio [qemu-img]=qemu-utils [qemu-io]=qemu-utils
  [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs [losetup]=mount [fusermount3]=fuse3
  [nft]=nftables [ip]=iproute2
)
missing=()
for bin in "${!NEED[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("${NEED[$bin]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  echo "test.sh: installing missing packages: $pkgs"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # --no-install-recommends: qemu-utils must not pull a different qemu in.
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $pkgs
fi

# In CI every external tool must be present: a test that would skip fails instead.
export NBD_MIRROR_REQUIRE_TOOLS="${NBD_MIRROR_REQUIRE_TOOLS:-1}"

cargo build --release --workspace --bins
log=$(mktemp)
trap 'rm -f "$log" "$log.vm"' EXIT
set +e
cargo test --workspace --release --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# --- vm step (vm-harness; docs/vm-harness.md) --------------------------------
# Real /dev/nbd0 in a QEMU/TCG guest (no nbd.ko on CI hosts): the failover and
# partition scenarios, one after the other (each guest uses both cores). Each
# scenario counts as one test in the summary; a failure makes the exit status
# non-zero. VMH_SCENARIOS overrides the list ("" skips the step, reported as
# skipped). First run downloads the guest kernel/busybox/e2fsprogs (and QEMU
# when the host has none) with `apt-get download` into $VMH_CACHE.
VMH_SCENARIOS="${VMH_SCENARIOS-failover partition}"
vm_pass=0; vm_fail=0; vm_skip=0
if [ -z "$VMH_SCENARIOS" ]; then
  vm_skip=1
  echo "test.sh: vm step skipped (VMH_SCENARIOS is empty)"
else
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # `strip` (initramfs) and package lists for `apt-get download` (a fresh
  # machine may have none); a failure here shows up as a failed scenario.
  command -v strip >/dev/null 2>&1 || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends binutils; } || echo "test.sh: warning: cannot install binutils (strip)"
  [ -e "${VMH_CACHE:-$HOME/.cache/nbd-mirror-vmh}/packages.done" ] || $SUDO apt-get update -qq || echo "test.sh: warning: apt-get update failed"
  for sc in $VMH_SCENARIOS; do
    t0=$(date +%s)
    set +e
    "${CARGO_TARGET_DIR:-target}/release/vm-harness" "$sc" 2>&1 | tee "$log.vm"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -eq 0 ] && grep -q "^PASS $sc:" "$log.vm"; then
      vm_pass=$((vm_pass + 1)); echo "test.sh: vm $sc ok ($(( $(date +%s) - t0 )) s)"
    else
      vm_fail=$((vm_fail + 1)); status=1; echo "test.sh: vm $sc FAILED (rc $rc, $(( $(date +%s) - t0 )) s)"
    fi
  done
  rm -f "$log.vm"
fi

# One closing line with the totals over every test binary (cargo prints one
# "test result" line per binary, the last of which may be an empty doc-test run)
# plus the vm scenarios.
awk -v vp="$vm_pass" -v vf="$vm_fail" -v vs="$vm_skip" \
    '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "summary: %d passed, %d failed, %d skipped, %d ignored (#[ignore]: measurements run by hand)\n", p + vp, f + vf, vs, i }' "$log"
exit "$status"
