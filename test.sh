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
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --release --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line with the totals over every test binary (cargo prints one
# "test result" line per binary, the last of which may be an empty doc-test run).
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
