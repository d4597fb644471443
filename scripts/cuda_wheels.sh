#!/usr/bin/env bash
# Fill .whl/ with what scripts/cuda_check.sh needs on a GPU machine that reaches no registry: the wheels its
# image lacks (for its Python, 3.12, x86-64) and a copy of the shared fixtures the bench workloads read.
# The image already has torch 2.11, transformers, peft, accelerate, triton, pyarrow, pandas, xxhash, fsspec,
# huggingface-hub, tqdm, psutil, jinja2 and pytest (/work/.library/device/KINDS.md): none of them is fetched.
# Missing there: TRL (the bench extra's pin), Liger (trl-liger), datasets (TRL's) and datasets' dill and
# multiprocess. All are pure-Python wheels, about 2.5 MB together.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
wheels=(trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
mkdir -p .whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wheels[@]}"
fixtures=${DUET_SHARED_FIXTURES:-../shared/fixtures}
if [ -d "$fixtures" ]; then
    rm -rf .whl/fixtures
    mkdir -p .whl/fixtures/tokenizers .whl/fixtures/data
    cp -r "$fixtures/tokenizers/qwen2.5-0.5b-instruct" .whl/fixtures/tokenizers/
    cp "$fixtures/data/llamafactory_dpo_en_demo.json" .whl/fixtures/data/
else
    echo "no shared fixtures at $fixtures: the bench workloads will have no tokenizer or data there" >&2
fi
ls .whl
du -sh .whl
