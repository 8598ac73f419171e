#!/usr/bin/env bash
# The GPU rows of README.md's "Speed" and "Memory" sections, in parts sized for a lent GPU machine's
# calls (at most 10 minutes a command), most wanted first. Prepare the wheels here first
# (bash scripts/gpu_wheels.sh), then run each part as one call:
#
#     run(command="bash scripts/gpu_bench.sh 1", carry=[".whl"], timeout_s=590)
#         SDXL at 1024 px, LoRA, bf16, with and without gradient checkpointing: diffalign against the
#         example loop; the measured peak memory of configs/sdxl_dpo.yaml
#     run(command="bash scripts/gpu_bench.sh 2", carry=[".whl"], timeout_s=590)
#         the same rows of diffalign with model.compile=true
#     run(command="bash scripts/gpu_bench.sh 3", carry=[".whl"], timeout_s=590)
#         SD3-medium (diffusers has no example loop for it); the measured peak of configs/sd3_dpo.yaml
#     run(command="bash scripts/gpu_bench.sh 4", carry=[".whl", ".flow_grpo"], timeout_s=590)
#         online rounds: Flow-GRPO's own scripts/train_sd3.py against diffalign train on SD3.5-medium's
#         architecture (random weights) at 512 px, one process, KL off (scripts/bench_online.py --flow-grpo);
#         prepare with GPU_WHEELS_FLOW_GRPO=PATH_TO_A_FLOW_GRPO_CHECKOUT bash scripts/gpu_wheels.sh
#
# Every table, JSON file and log lands in $OUT (runs/gpu_bench without one). Each step has its own
# time limit, and bench_train logs each row's pairs/s as it finishes, so a slow step leaves the
# others' figures. A dry run on a CPU, with tiny models:
#     GPU_BENCH_MODEL=tiny-sdxl GPU_BENCH_DIT=tiny-sd3 GPU_BENCH_RESOLUTION=64 GPU_BENCH_PRECISION=no \
#         bash scripts/gpu_bench.sh 1
#     FLOW_GRPO=~/flow_grpo GPU_BENCH_ONLINE=tiny-sd3 GPU_BENCH_ONLINE_RESOLUTION=64 GPU_BENCH_PRECISION=no \
#         bash scripts/gpu_bench.sh 4
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_bench.sh 1|2|3|4}
out=${OUT:-runs/gpu_bench}
mkdir -p "$out"
model=${GPU_BENCH_MODEL:-sdxl}
dit=${GPU_BENCH_DIT:-sd3-medium}
resolution=${GPU_BENCH_RESOLUTION:-1024}
precision=${GPU_BENCH_PRECISION:-bf16}
online_model=${GPU_BENCH_ONLINE:-sd35-medium}
online_resolution=${GPU_BENCH_ONLINE_RESOLUTION:-512}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then  # what the device image lacks (scripts/gpu_wheels.sh)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
    python3 -c "import sys, torch, diffusers, transformers, accelerate, peft, diffalign; print('python', sys.version.split()[0]); print(*(f'{m.__name__} {m.__version__}' for m in (torch, diffusers, transformers, accelerate, peft)), sep='\n'); print('cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$out/versions-$part.txt"

# bench_train at the resolution and precision, one pair per step, one round
train_rows() {  # NAME LIMIT_S ARGS...: its table and JSON as $out/train-NAME.{log,json}
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 scripts/bench_train.py --resolution "$resolution" --precision "$precision" --batch 1 \
        --repeats 1 --warmup 2 --steps 5 "$@" --json "$out/train-$name.json" 2>&1 | tee "$out/train-$name.log"
}
peak_memory() {  # CONFIG MODEL: torch.cuda.max_memory_allocated of real steps of configs/CONFIG.yaml
    timeout 160 python3 scripts/bench_memory.py "configs/$1.yaml" --model "assets/models/$2" --measure --batches 1 \
        --set "data.resolution=$resolution" --set "train.mixed_precision='$precision'" \
        --json "$out/memory-$1.json" 2>&1 | tee "$out/memory-$1.log"
}

case "$part" in
1)
    train_rows "$model" 400 --models "$model" --grad-ckpt both
    peak_memory sdxl_dpo "$model"
    ;;
2)
    train_rows "$model-compile" 560 --models "$model" --grad-ckpt both --impls diffalign+compile
    ;;
3)
    train_rows "$dit" 400 --models "$dit" --grad-ckpt both
    peak_memory sd3_dpo "$dit"
    ;;
4)
    timeout 560 python3 scripts/bench_online.py --flow-grpo "${FLOW_GRPO:-.flow_grpo}" --models "$online_model" \
        --resolution "$online_resolution" --precision "$precision" --group-size 4 --repeats 1 \
        --json "$out/online.json" 2>&1 | tee "$out/online.log"
    ;;
*)
    echo "usage: gpu_bench.sh 1|2|3|4" >&2
    exit 2
    ;;
esac
