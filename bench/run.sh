#!/usr/bin/env bash
# The one command for the sync benchmark (issue 3): ghostmirror vs rsync on
# loopback. Installs rsync from Debian's packages if it is missing, builds
# `ghostmirror` and `gm-bench` in release mode, then runs gm-bench with the
# arguments given here:
#
#   bench/run.sh [--quick] [--runs 3] [--scenarios src,large,...] [--work-dir /tmp/gm-bench]
#
# `bench/run.sh --help` lists every option. Results: the table on stdout,
# JSON in bench/results/latest.json (or --out). See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v rsync >/dev/null 2>&1; then
  echo "run.sh: installing rsync" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get install -y rsync >/dev/null 2>&1 || {
    $SUDO apt-get update >/dev/null
    $SUDO apt-get install -y rsync >/dev/null
  }
fi

cargo build --release --locked -p ghostmirror -p gm-bench >&2
exec target/release/gm-bench --ghostmirror target/release/ghostmirror "$@"
