#!/usr/bin/env bash
# Runs the engine's unit tests under valgrind's memcheck: the check CI keeps on
# the one module with `unsafe` code (crates/engine/src/kernels.rs, the GEMM
# calls and the CPU-feature dispatch), and on the kernels that call it. Any
# invalid read or write, use of uninitialised memory or leak of a block that
# is still reachable only through freed memory fails the run.
#
#   scripts/memcheck.sh          # installs valgrind from Debian if missing (root)
#
# Why valgrind rather than Miri or a sanitizer: both need a nightly toolchain,
# and this project builds with the machine's one stable toolchain. Memcheck
# runs the real binary, with the gemm crate's vectorised kernels (valgrind
# reports AVX2 to it, so the AVX2 paths are the ones checked; AVX-512 paths are
# not, valgrind cannot run them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v valgrind >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: valgrind is missing; install it (apt-get install valgrind) or run as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-cache show valgrind >/dev/null 2>&1; then
    apt-get update -qq
  fi
  apt-get install -y -qq valgrind >/dev/null
fi

# The engine's unit-test binary, as `cargo test --workspace` builds it (the
# step before this one in scripts/test: nothing is rebuilt).
bin=$(scripts/test-binary.sh capsule_engine lib)

# One test thread keeps the run deterministic; rayon's pool still runs the
# kernels on two threads, so the threaded split paths are checked too. The
# test that compares CPUID's last-level cache with Linux's sysfs is skipped:
# valgrind answers CPUID for a CPU of its own (an 8 MiB L3), while sysfs
# describes the real one. It has no unsafe code to check.
RAYON_NUM_THREADS=2 valgrind --quiet --error-exitcode=1 --leak-check=no \
  --track-origins=yes "$bin" --test-threads=1 -q \
  --skip kernels::tests::last_level_cache_is_what_linux_reports
