"""Peak memory of one training step of a config, the largest batch that fits, and how sharding divides it.

Two ways to get the figure:

- ``estimate`` (the default; any machine, no GPU, no weights): builds the run's models exactly
  as the trainer does (``diffalign.train.models.build_models``) on the meta device, gives them
  fake storage (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes and dtypes, no data),
  and runs one real training step of the configured objective on them (forward of policy and
  reference, backward, gradient clipping) under autocast: ``diffalign.train.memory``, whose docstring
  says what the figure counts and leaves out (read it as a lower bound), and which
  ``diffalign train CONFIG --plan`` prints too. CPU autocast keeps group_norm and layer_norm in
  bf16 where CUDA autocast runs them in fp32 (PyTorch's AMP op reference, "CUDA Ops that can
  autocast to float32"); the estimate runs them in fp32 as CUDA does, since their fp32 outputs
  are what a GPU step saves for backward. With ``data.precompute`` the text encoders and the VAE
  are not counted: the trainer keeps them on the CPU during the steps.
- ``--measure`` (CUDA): runs real steps with random weights and reads
  ``torch.cuda.max_memory_allocated``; the batch search then uses real out-of-memory errors
  under ``torch.cuda.set_per_process_memory_fraction`` for the budget.

The largest batch is found by doubling then bisection over ``train.batch_size`` (pairs per
GPU), each try in a fresh process. The sharding table divides what the strategies shard over N
GPUs: ZeRO-1 the optimiser state, ZeRO-2 also the gradients, FSDP2 (configs/accelerate/fsdp2.yaml)
also every weight of the denoiser, frozen ones included, and a full fine-tune's reference copy,
plus what it gathers at once (the root module's weights, two blocks, one block's gradients:
``diffalign.train.memory.fsdp2_parts``); with CPU offload (fsdp2_offload.yaml) the shards, their
gradients and the optimiser state live in host memory. Activations are never sharded, and the
text encoders and the VAE are replicated. DDP keeps no second copy of the gradients: the trainer
sets ``gradient_as_bucket_view``, so they are views of its all-reduce buckets. ``--max-batch``
searches the largest batch whose figure under ``--strategy`` on ``--strategy-gpus`` GPUs fits.

    python scripts/bench_memory.py configs/sdxl_dpo.yaml --model assets/models/sdxl --batches 1,2
    python scripts/bench_memory.py configs/sdxl_dpo_full.yaml --model assets/models/sdxl \\
        --set train.adam_8bit=true --max-batch --budget-gb 80
    python scripts/bench_memory.py configs/flux_dpo.yaml --set train.lora_rank=0 --max-batch \\
        --strategy FSDP2 --strategy-gpus 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from diffalign.train.memory import (  # the estimate, shared with `diffalign train CONFIG --plan`
    GIB,
    LiveStorage,
    breakdown,
    materialise,
    nbytes,
    optimizer_state,
    sharded_per_gpu,
    training_step_memory,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # bench_train's synthetic data


def example_loop_memory(config) -> dict[str, float]:
    """Peak bytes of one step of diffusers' example loop (``bench_train.py``) on the config's settings.

    Model, batch, resolution, precision, LoRA rank, gradient checkpointing and 8-bit Adam come
    from the config; the step VAE-encodes the 2B images and text-encodes the prompts as the
    example does every step.
    """
    from bench_train import build_example_models, example_step

    from diffalign.diffusion import mixed_precision_dtype

    mc, tc = config.model, config.train
    if tc.lora_rank == 0:
        raise SystemExit("diffusers' Diffusion-DPO example trains LoRA only; set train.lora_rank")
    spec = {"model": str(Path(mc.path).resolve()), "precision": tc.mixed_precision, "lora_rank": tc.lora_rank,
            "grad_ckpt": mc.gradient_checkpointing}
    with torch.device("meta"):
        backbone = build_example_models(spec, torch.device("meta"))
    modules = materialise(backbone, [], fake=True)
    params = [p for p in backbone.denoiser.parameters() if p.requires_grad]
    weights = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tracker = LiveStorage()
    with tracker:
        resolution = config.data.resolution  # winners then losers, fp32 as the example's collate_fn makes them
        pixels = weights[0].new_empty((2 * tc.batch_size, 3, resolution, resolution), dtype=torch.float32)
        tracker.add(*weights, pixels)
        states = optimizer_state(params, tc.adam_8bit)
        at_rest = tracker.current
        example_step(backbone, pixels, ["a photograph of an astronaut riding a horse"] * tc.batch_size,
                     mixed_precision_dtype(tc.mixed_precision))
        grads = nbytes(p.grad for p in params if p.grad is not None)
    return breakdown(tracker, at_rest, grads, weights, params, states)


def measured_step_memory(config, work: Path) -> dict[str, float]:
    """Peak memory of three real training steps with random weights on synthetic pairs.

    CUDA: ``torch.cuda.max_memory_allocated``; elsewhere the process's peak RSS (which also
    holds the Python runtime and the data). Runs in ``work``: data, cache and run folder.
    """
    import resource

    from bench_train import synthetic_pairs

    from diffalign.objectives import OBJECTIVES
    from diffalign.train.trainer import PreferenceTrainer

    if OBJECTIVES[config.objective.name].dataset != "pairs" or config.data.score_columns:
        raise SystemExit("--measure trains on synthetic labelled pairs: it takes pair objectives without "
                         f"score columns, not {config.objective.name}")
    tc = config.train
    config.data.path = str(synthetic_pairs(work / "pairs.parquet", 3 * tc.batch_size, config.data.resolution))
    config.data.cache_dir, config.output_dir = str(work / "cache"), str(work / "run")
    tc.gradient_accumulation, tc.max_steps, tc.checkpoint_every, tc.report_to = 1, 3, 0, "none"
    trainer = PreferenceTrainer(config)
    if config.data.precompute:  # as train() does before the first step
        trainer._precompute(0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for step in range(3):  # the optimiser state exists from the first step on
        trainer._optimizer_step(step)
    if torch.cuda.is_available():
        return {"peak_gb": torch.cuda.max_memory_allocated() / GIB}
    return {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}  # KiB on Linux


def sharding_refusal(config, gpus: int) -> list[str]:
    """Why the trainer would refuse ``config`` under FSDP2 on ``gpus`` GPUs (empty: it would not)."""
    from diffalign.objectives import OBJECTIVES
    from diffalign.train.sharding import fsdp2_conflicts

    return fsdp2_conflicts(config, OBJECTIVES[config.objective.name], gpus)


def largest_fitting(fits: Callable[[int], bool], limit: int = 1024) -> int:
    """The largest n in [1, limit] with fits(n), assuming fits is monotone; 0 if even 1 does not fit."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _load(args, batch: int):
    from diffalign.train import load_config

    overrides = [f"model.path={args.model}", "model.random_init=true", "model.compile=false",
                 f"train.batch_size={batch}",
                 "data.path=no-data-is-read", *args.set]
    config = load_config(args.config, overrides)
    if config.train.reference_dtype == "auto" and config.train.mixed_precision != "no":
        config.train.reference_dtype = config.train.mixed_precision  # what ``auto`` means on a GPU
    return config


def _row(args, batch: int) -> dict | None:
    """One measurement in a fresh process; None when the batch ran out of memory."""
    spec = {"config": str(args.config), "model": str(args.model), "set": args.set, "batch": batch,
            "measure": args.measure, "budget_gb": args.budget_gb, "list_size": args.list_size,
            "example_loop": args.example_loop, "strategy": args.strategy, "strategy_gpus": args.strategy_gpus}
    command = [sys.executable, __file__, str(args.config), "--row", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode == 3:
        return None
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"batch {batch} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_row(spec: dict) -> None:
    config = _load(argparse.Namespace(**{**spec, "config": Path(spec["config"])}), spec["batch"])
    if spec["measure"]:
        if not torch.cuda.is_available():
            raise SystemExit("--measure needs a CUDA GPU")
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["budget_gb"] * GIB / total))
        try:
            with tempfile.TemporaryDirectory() as work:
                row = measured_step_memory(config, Path(work))
        except torch.OutOfMemoryError:
            raise SystemExit(3)
    else:
        row = example_loop_memory(config) if spec["example_loop"] else training_step_memory(config, spec["list_size"])
        needed = row["peak_gb"] if spec["example_loop"] else \
            sharded_per_gpu(row, spec["strategy_gpus"])[spec["strategy"]]
        if needed > spec["budget_gb"]:
            print(json.dumps(row))
            raise SystemExit(3)
    print(json.dumps({"batch": spec["batch"], **row}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a training config (configs/*.yaml)")
    parser.add_argument("--model", type=Path, required=False, default=None,
                        help="an architecture folder to build with random weights (assets/models/sdxl); "
                             "default: the config's model.path, or the shipped architecture of its name")
    parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    parser.add_argument("--batches", help="pairs per GPU to report (comma-separated); default: the config's")
    parser.add_argument("--max-batch", action="store_true", help="also search the largest batch within --budget-gb")
    parser.add_argument("--budget-gb", type=float, default=80.0, help="GPU memory budget in GiB")
    parser.add_argument("--gpus", default="1,2,4,8", help="GPU counts for the sharding table")
    parser.add_argument("--strategy", default="DDP", choices=["DDP", "ZeRO-1", "ZeRO-2", "FSDP2", "FSDP2 + CPU offload"],
                        help="what --max-batch fits within --budget-gb: the per-GPU figure of this strategy")
    parser.add_argument("--strategy-gpus", type=int, default=8, help="GPUs the --strategy figure is for")
    parser.add_argument("--list-size", type=int, default=4, help="images per example for ranked-list objectives")
    parser.add_argument("--measure", action="store_true", help="measure on the CUDA GPU instead of estimating")
    parser.add_argument("--example-loop", action="store_true",
                        help="estimate diffusers' Diffusion-DPO example loop (bench_train.py) "
                             "on the config's settings")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_memory.json"))
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        return _run_row(json.loads(args.row))
    if args.measure and args.example_loop:
        raise SystemExit("--measure runs diffalign's trainer; the example loop's measured memory is in bench_train.py")
    from diffalign.train import load_config

    if args.model is None:  # the model's folder when it is here, else the shipped architecture of its name
        from diffalign.recipes.plan import architecture_folder

        path = load_config(args.config, args.set).model.path
        folder, _ = architecture_folder(path)
        if folder is None:
            raise SystemExit(f"{path} is not on this machine and no shipped architecture has its name: give --model "
                             "a folder holding its configs (assets/models/...)")
        args.model = folder
    if args.batches is None:
        args.batches = str(load_config(args.config, [f"model.path={args.model}", *args.set]).train.batch_size)
    budget = args.budget_gb
    args.budget_gb = float("inf")  # the listed batches are reported whatever they need
    rows = [_row(args, int(b)) for b in args.batches.split(",")]
    largest = None
    if args.max_batch:
        args.budget_gb = budget
        largest = largest_fitting(lambda n: _row(args, n) is not None)
    kind = "measured (CUDA max_memory_allocated)" if args.measure else "estimated (fake tensors; a lower bound)"
    kind += ", diffusers' example loop" if args.example_loop else ""
    print(f"\n{args.config} on {args.model} {' '.join(args.set)}: peak memory per GPU, {kind}\n")
    print("| batch per GPU | peak GiB | weights | trained weights | grads | optimiser + EMA "
          "| activations + temporaries |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row.get(key, float('nan')):.2f}" for key in
                 ("peak_gb", "weights_gb", "trained_weights_gb", "grads_gb", "optimizer_and_ema_gb", "activations_gb")]
        print(f"| {row['batch']} | " + " | ".join(cells) + " |")
    if largest is not None:
        under = "" if args.strategy == "DDP" else f" under {args.strategy} on {args.strategy_gpus} GPUs"
        print(f"\nlargest batch within {budget:g} GiB{under}: {largest} pairs per GPU")
    if not args.measure:
        gpus = [int(n) for n in args.gpus.split(",")]
        print(f"\nper GPU at batch {rows[0]['batch']}, GiB, when N GPUs shard the model state:\n")
        print("| strategy | " + " | ".join(f"N={n}" for n in gpus) + " |")
        print("|---|" + "---|" * len(gpus))
        config = load_config(args.config, [f"model.path={args.model}", *args.set])
        refused = {n: sharding_refusal(config, n) for n in gpus if n > 1}
        for name in sharded_per_gpu(rows[0], 1):
            cells = ["refused" if refused.get(n) and name.startswith("FSDP2") else
                     f"{sharded_per_gpu(rows[0], n)[name]:.1f}" for n in gpus]
            print(f"| {name} | " + " | ".join(cells) + " |")
        for n, why in refused.items():
            if why:
                print(f"\nFSDP2 on {n} GPUs: the trainer refuses this config: {'; '.join(why)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": str(args.config), "model": str(args.model), "set": args.set,
                                     "kind": kind, "rows": rows, "largest_batch": largest,
                                     "strategy": [args.strategy, args.strategy_gpus],
                                     "budget_gb": budget}, indent=2))


if __name__ == "__main__":
    main()
