#!/usr/bin/env bash
# What tests/test_fsdp2.py cannot check on CPUs, for a machine with several GPUs (two at least; the memory rows
# of docs/many-gpus.md are for 8). Every log lands in $OUT (runs/gpu_fsdp2 without one).
#
#     bash scripts/gpu_fsdp2.sh parity    # tiny SD3 Diffusion-DPO on 1 GPU at batch 2N and on N GPUs at batch 2 under
#                                         # each of configs/accelerate/fsdp2*.yaml (CPU offload and bf16 gathering over
#                                         # NCCL included): the largest weight difference to the one-GPU run
#     bash scripts/gpu_fsdp2.sh memory    # the measured peak per GPU (metrics.json's gpu_peak_gib) of 3 steps of each
#                                         # row of docs/many-gpus.md's table, with and without CPU offload, on random
#                                         # weights of the real architectures (no download) and example pairs
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_fsdp2.sh parity|memory}
out=${OUT:-runs/gpu_fsdp2}
gpus=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0  # any run or comparison that failed makes the script exit 1 after the rest have run
if [ "$gpus" -lt 2 ]; then
    echo "gpu_fsdp2.sh needs two GPUs at least (found $gpus); FSDP2 shards over processes, one a GPU" >&2
    exit 2
fi
launch() {  # ACCELERATE_CONFIG ARGS...: diffalign train under that config on every GPU
    local config=$1
    shift
    accelerate launch --config_file "configs/accelerate/$config.yaml" --num_processes "$gpus" -m diffalign train "$@"
}
case "$part" in
parity)
    common=(configs/toy_diffusion_dpo.yaml model.path=assets/models/tiny-sd3 model.random_init=true data.resolution=32
            train.max_steps=3 train.checkpoint_every=0 train.adam_epsilon=1e-3 train.mixed_precision=bf16
            train.lr_scheduler=constant train.warmup_steps=0 validation.every=0 train.report_to=none)
    diffalign train "${common[@]}" "train.batch_size=$((2 * gpus))" "output_dir=$out/one" 2>&1 | tail -2 ||
        { echo "the one-GPU run every comparison needs failed" >&2; exit 1; }
    for config in fsdp2 fsdp2_offload fsdp2_checkpointing; do
        launch "$config" "${common[@]}" train.batch_size=2 "output_dir=$out/$config" > "$out/$config.log" 2>&1 ||
            { echo "$config failed: see $out/$config.log"; failed=1; continue; }
        python3 - "$out" "$config" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file
out, config = Path(sys.argv[1]), sys.argv[2]
one = load_file(out / "one/final/pytorch_lora_weights.safetensors")
sharded = load_file(out / config / "final/pytorch_lora_weights.safetensors")
print(f"{config}: largest difference to one GPU {max((one[k] - sharded[k]).abs().max().item() for k in one):.2e}, "
      f"largest LoRA weight {max(v.abs().max().item() for v in one.values()):.2e}")
PY
        [ $? -eq 0 ] || failed=1
    done
    ;;
memory)
    diffalign data example pairs "$out/pairs/pairs.parquet" > /dev/null
    diffalign data example pairs "$out/clips/pairs.parquet" --frames 33 > /dev/null
    rows=("flux_dpo|model.path=assets/models/flux-dev train.lora_rank=0|pairs"
          "qwen_image_dpo|model.path=assets/models/qwen-image|pairs"
          "qwen_image_dpo|model.path=assets/models/qwen-image train.lora_rank=0|pairs"
          "wan21_dpo|model.path=assets/models/wan21-t2v-14b|clips")
    for row in "${rows[@]}"; do
        IFS='|' read -r recipe settings data <<< "$row"
        for config in fsdp2 fsdp2_offload; do
            name="$recipe-$(echo "$settings" | tr -c 'a-z0-9' '_' | cut -c1-40)-$config"
            # shellcheck disable=SC2086
            launch "$config" "configs/$recipe.yaml" $settings model.random_init=true "data.path=$out/$data/pairs.parquet" \
                train.batch_size=1 train.max_steps=3 train.checkpoint_every=0 validation.every=0 train.report_to=none \
                "output_dir=$out/$name" > "$out/$name.log" 2>&1 &&
            python3 -c "import json, sys; print(sys.argv[1], json.load(open(sys.argv[2]))['gpu_peak_gib'], 'GiB')" \
                "$name" "$out/$name/metrics.json" 2>/dev/null || { echo "$name failed: see $out/$name.log"; failed=1; }
        done
    done
    ;;
*)
    echo "usage: gpu_fsdp2.sh parity|memory" >&2
    exit 2
    ;;
esac
exit "$failed"
