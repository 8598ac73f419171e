#!/usr/bin/env bash
# The Python packages diffalign needs that a lent GPU machine's image lacks, as wheels in .whl/
# (ignored by git), for scripts/gpu_bench.sh to install there. Run here, where PyPI is reachable:
#
#     bash scripts/gpu_wheels.sh            # then: run(command="bash scripts/gpu_bench.sh 1", carry=[".whl"])
#     GPU_WHEELS_FLOW_GRPO=~/flow_grpo bash scripts/gpu_wheels.sh   # also part 4's checkout (.flow_grpo) and imports
#
# The device image (Python 3.12; the device tool's KINDS.md lists its packages) has torch,
# transformers, accelerate, peft, safetensors, pyarrow, pandas and timm, but not diffusers, datasets
# or open-clip-torch. The versions are those this project's CI installs; the wheels are pure Python.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 open_clip_torch==3.3.0 ftfy==6.3.1 \
    wcwidth==0.9.4 importlib_metadata==10.2.0
if [ -n "${GPU_WHEELS_FLOW_GRPO:-}" ]; then  # gpu_bench.sh 4: a copy of a flow_grpo checkout and what it imports
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl absl-py ml_collections wandb
    rm -rf .flow_grpo && mkdir .flow_grpo
    cp -r "$GPU_WHEELS_FLOW_GRPO"/config "$GPU_WHEELS_FLOW_GRPO"/flow_grpo "$GPU_WHEELS_FLOW_GRPO"/scripts .flow_grpo/
fi
du -sh .whl
