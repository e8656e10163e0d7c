#!/usr/bin/env bash
# Prints the path of one test binary as `cargo test --workspace` builds it
# (building it first if needed), so that a later step can run it without
# cargo rebuilding anything:
#
#   scripts/test-binary.sh TARGET KIND    # e.g. capsule_engine lib, reference_models test
#
# Why not `cargo test -p PKG` or `--test NAME`: cargo unifies dependency
# features over the packages and targets it is asked to build, so a narrower
# command builds a second copy of much of the workspace (CI spent 90 s on the
# engine's tests for memcheck and 150 s on the reference models' that way).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ $# -ne 2 ]; then
  echo "usage: scripts/test-binary.sh TARGET KIND" >&2
  exit 2
fi

bin=$(cargo test --workspace --no-run --message-format=json |
  python3 -c 'import json, sys
name, kind = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == [kind] \
       and m["target"]["name"] == name and m.get("executable"):
        print(m["executable"])' "$1" "$2")
if [ -z "$bin" ]; then
  echo "error: cargo test --workspace builds no $2 test binary named $1" >&2
  exit 1
fi
echo "$bin"
