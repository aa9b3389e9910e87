#!/usr/bin/env bash
# The local two-node demo: builds nbd-mirror, then runs `mdctrl demo` (two
# agents on loopback, sparse files under a temp dir, cleaned up on exit).
# Needs only cargo; pass --keep to keep the demo's directory.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --workspace --bins
exec ./target/release/mdctrl demo "$@"
