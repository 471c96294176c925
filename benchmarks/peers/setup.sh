#!/usr/bin/env bash
# Create the virtualenv that holds the peer libraries (Surprise, LensKit, cornac)
# used by the benchmarks for side-by-side comparison with recsys.
#
# The peers live in their own venv so that their pins (LensKit's numpy/pandas/
# pydantic ranges, Surprise's compiled extension, cornac's Cython builds) never
# constrain or get mixed into the project's own environment.
#
# Usage (from anywhere):
#   bash benchmarks/peers/setup.sh
#
# Environment:
#   RECSYS_PEERS_VENV      venv path; relative paths are taken from the repo root
#                          (default: .venv-peers)
#   PYTHON                 interpreter used to create the venv (default: python3)
#   RECSYS_TORCH_INDEX_URL optional extra package index for the torch wheel, e.g.
#                          https://download.pytorch.org/whl/cpu on machines where
#                          the default index would resolve torch to a CUDA build.
#
# Idempotent: if the venv already imports every peer library, nothing is done.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${RECSYS_PEERS_VENV:-.venv-peers}"
case "$venv" in
  /*) ;;
  *) venv="$repo_root/$venv" ;;
esac
python_bin="${PYTHON:-python3}"
torch_version="2.13.0"
check='import torch, surprise, lenskit, cornac, pandas; assert torch.__version__.split("+")[0] == "'"$torch_version"'"'

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
  echo "peers venv ready: $venv"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "creating peers venv at $venv (with $python_bin)"
  "$python_bin" -m venv "$venv"
fi

pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
torch_args=()
if [[ -n "${RECSYS_TORCH_INDEX_URL:-}" ]]; then
  torch_args+=(--extra-index-url "$RECSYS_TORCH_INDEX_URL")
fi

# torch first and pinned: left for the peers' dependency resolution, pip would
# pull the latest (multi-GB, CUDA) build.
"${pip[@]}" "${torch_args[@]}" "torch==$torch_version"
"${pip[@]}" "torch==$torch_version" scikit-surprise lenskit cornac pandas

"$venv/bin/python" -c "$check"
"$venv/bin/python" - <<'PY'
from importlib.metadata import version

for dist in ("torch", "scikit-surprise", "lenskit", "cornac", "pandas", "numpy"):
    print(f"{dist}=={version(dist)}")
PY
echo "peers venv ready: $venv"
