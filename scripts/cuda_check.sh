#!/usr/bin/env bash
# The CUDA check of issue 19, in one call on a bare GPU machine: scripts/cuda_check.sh OUT_DIR
#
# Parts, each with its own time limit, each going on when an earlier one failed:
#   env        the GPU, the driver, python and package versions
#   tests      tests/test_cuda.py (the cuda-marked tests)
#   demo       the demo end to end on CUDA (python -m core.run model.device=cuda), then duet eval on it
#   torchrun   torchrun --nproc_per_node 1 -m core.run model.device=cuda
#   bench-qwen duet bench on the Qwen2.5-0.5B shape, 8 pairs, max length 1024: duet-torch, trl, trl-liger
#   bench-smollm the same on the real SmolLM2-135M, when bench/workloads.py has a workload smollm2-135m
# OUT_DIR gets one log per part, summary.json (every part's status, seconds and figures) and the demo's
# evaluation report (demo-eval.json): at most 8 files.
# Wheels and fixtures the machine cannot fetch come in .whl/ (scripts/cuda_wheels.sh fills it).
#
# CUDA_CHECK_DRY_RUN=1 runs every part on the CPU with tiny settings: the plumbing (arguments, JSON), not
# the figures. CUDA_CHECK_BUDGET (seconds, default 520) bounds the whole; PYTHON picks the interpreter.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: scripts/cuda_check.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
root=$PWD
dry=${CUDA_CHECK_DRY_RUN:-0}
budget=${CUDA_CHECK_BUDGET:-520}
if [ "$dry" = 1 ] && [ -x .venv/bin/python ]; then
    python=${PYTHON:-.venv/bin/python}
else
    python=${PYTHON:-python3}
fi
work=$(mktemp -d /tmp/cuda-check.XXXXXX)
parts=$work/parts
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false DUET_CACHE_DIR=$work/cache
if [ -d .whl/fixtures ]; then
    export DUET_FIXTURES=$root/.whl/fixtures
fi

if [ "$dry" = 1 ]; then
    device=cpu
    dtype=float32
    steps=(train.max_steps=4 train.eval_every=2 train.save_every=2)
    bench_qwen=(--workload demo --device cpu --dtype float32 --steps 2 --peak-tflops 1)
    bench_smollm=(--device cpu --dtype float32 --steps 2 --pairs 8 --peak-tflops 1)
else
    device=cuda
    dtype=bfloat16
    steps=()
    bench_qwen=(--workload qwen0.5b-gpu --device cuda --dtype bfloat16 --steps 10)
    bench_smollm=(--device cuda --dtype bfloat16 --steps 10)
fi

# -- set-up: the carried wheels into a folder of their own, first on the path ---------------------------------
{
    echo "\$ install .whl/*.whl"
    wheels=(.whl/*.whl)
    if [ "$dry" = 1 ]; then
        wheels=(.whl/trl-*.whl .whl/liger_kernel-*.whl) # the others are in .venv, and are built for 3.12
    fi
    if [ -e "${wheels[0]}" ]; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$work/site" "${wheels[@]}" && echo "installed ${wheels[*]}"
    else
        echo "no wheels in .whl/: TRL and Liger must already be installed"
    fi
} >"$out/env.log" 2>&1
export PYTHONPATH=$work/site:$root${PYTHONPATH:+:$PYTHONPATH}
parts_py=("$python" scripts/cuda_check_parts.py)

started=$SECONDS
rc=0
elapsed=0

# run NAME LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds (less when the budget runs short), its
# output in OUT_DIR/NAME.log; sets rc and elapsed
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - started)))
    if [ "$left" -lt "$limit" ]; then
        limit=$((left > 10 ? left : 10))
    fi
    local begin=$SECONDS
    {
        echo "\$ $* (limit ${limit} s)"
        timeout -k 10 "$limit" "$@"
    } >>"$out/$name.log" 2>&1
    rc=$?
    elapsed=$((SECONDS - begin))
}

record() { # NAME NOTE [FIGURES]
    "${parts_py[@]}" record "$parts" "$1" "$rc" "$elapsed" "$2" "${3:-}"
}

# -- env --------------------------------------------------------------------------------------------------------
run env 60 bash -c "nvidia-smi || echo 'no nvidia-smi'; \"$python\" -V; \"$python\" -m pip list 2>/dev/null | \
grep -iE '^(torch|transformers|peft|accelerate|trl|liger.kernel|datasets|triton|pyarrow|numpy|safetensors) '"
"$python" - >"$work/env.json" 2>>"$out/env.log" <<'EOF'
import importlib.metadata as metadata, json, platform, torch
names = ["torch", "transformers", "peft", "accelerate", "trl", "liger-kernel", "datasets", "triton", "pyarrow"]
versions = {}
for name in names:
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
cuda = torch.cuda.is_available()
print(json.dumps({
    "python": platform.python_version(), "versions": versions, "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "bf16": bool(cuda and torch.cuda.is_bf16_supported(including_emulation=False)),
    "nccl": str(torch.cuda.nccl.version()) if cuda else None,
}))
EOF
record env "" "$work/env.json"

# -- the cuda-marked tests ------------------------------------------------------------------------------------
run tests 150 "$python" -m pytest tests/test_cuda.py -m cuda -q -rs -p no:cacheprovider --junitxml="$work/junit.xml"
"${parts_py[@]}" junit "$work/junit.xml" "$work/tests.json"
record tests "$([ "$dry" = 1 ] && echo 'dry run: skipped without a GPU')" "$work/tests.json"

# -- the demo end to end --------------------------------------------------------------------------------------
# with duet eval at the end (the rule judge of the demo): generation, KL scoring and the report on the GPU
run demo 90 "$python" -m core.run model.device=$device model.backend=torch "${steps[@]}" \
    train.output_dir="$work/demo" train.cache_dir="$work/cache" evaluation.at_end=true judge.kind=rule \
    judge.rule=models/demo/concise.py evaluation.prompts=models/demo/unseen_prompts.txt
cp "$work"/demo/*/eval/eval.json "$out/demo-eval.json" 2>/dev/null
"${parts_py[@]}" run-figures "$work/demo" "$work/demo.json"
record demo "" "$work/demo.json"

# -- torchrun, one process -------------------------------------------------------------------------------------
run torchrun 60 "$python" -m torch.distributed.run --standalone --nproc_per_node 1 -m core.run \
    model.device=$device model.backend=torch train.max_steps=20 "${steps[@]}" \
    train.output_dir="$work/torchrun" train.cache_dir="$work/cache"
"${parts_py[@]}" run-figures "$work/torchrun" "$work/torchrun.json"
record torchrun "one process, NCCL process group and DDP (figures.process_group)" "$work/torchrun.json"

# -- duet bench: Duet, TRL, TRL+Liger ----------------------------------------------------------------------------
smollm=0
if "${parts_py[@]}" has-workload smollm2-135m 2>>"$out/env.log"; then
    smollm=1
fi
run bench-qwen $((smollm ? 220 : 270)) "$python" -m bench "${bench_qwen[@]}" --variants duet-torch,duet-torch-gc,trl,trl-liger \
    --timeout $((smollm ? 60 : 75)) --json "$work/bench-qwen.json"
record bench-qwen "pairs/s over the whole run (prep, reference, steps); MFU of the dense bf16 peak" \
    "$work/bench-qwen.json"

if [ "$smollm" = 1 ]; then
    run bench-smollm 100 "$python" -m bench --workload smollm2-135m "${bench_smollm[@]}" \
        --variants duet-torch,trl,trl-liger --timeout 30 --json "$work/bench-smollm.json"
    record bench-smollm "" "$work/bench-smollm.json"
else
    rc=0 elapsed=0
    record bench-smollm "skipped: no workload smollm2-135m, or its model is not installed here (its 98 MB GGUF cannot travel)"
fi

"${parts_py[@]}" summary "$parts" "$out/summary.json"
echo "[cuda_check] $((SECONDS - started)) s; $dtype on $device; logs and summary.json in $out"
rm -rf "$work"
grep -q '"status": "\(failed\|timed out\)"' "$out/summary.json" && exit 1
exit 0
