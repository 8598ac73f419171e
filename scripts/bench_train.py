"""Training throughput, memory and MFU of diffalign's Diffusion-DPO step against diffusers' example loop.

Each row runs in its own process (so CPU peak RSS is per row) on random weights built from a
config folder in assets/models (no download) and a synthetic dataset of random images:

- ``diffalign``: the real trainer (``PreferenceTrainer``), latents and prompt embeddings cached
  after the first epoch, winner and loser (and the reference) in one batched forward each, one
  host sync per step (the NaN guard), fused AdamW (one kernel for all trained tensors, on CUDA and CPU).
- ``diffusers-example``: a faithful re-implementation of the loop in diffusers'
  examples/research_projects/diffusion_dpo/train_diffusion_dpo.py (SD1.5) and
  train_diffusion_dpo_sdxl.py: every step VAE-encodes the concatenated winner/loser pixels,
  text-encodes the prompts, noises both halves with one shared noise and timestep, runs the
  LoRA UNet on the 2B batch (the frozen UNet and text encoders cast to the mixed-precision
  dtype, the VAE in fp32, no autocast; LoRA weights upcast to fp32 under fp16 only), runs the
  reference as the same UNet with adapters disabled (``disable_adapters``/``enable_adapters``), computes -logsigmoid(beta_dpo (ref_diff - model_diff))
  and logs loss, raw model loss, reference loss and implicit accuracy with ``.item()`` every step.
  Image decoding is excluded for both (the example decodes in DataLoader workers, diffalign in
  its reader threads; `scripts/bench_data.py reader` measures what is left of it). diffusers has no
  DPO example for flow-matching models (SD3, FLUX.1); for them the same loop noises as diffusers'
  SD3 and FLUX LoRA training scripts do (a training-grid index drawn uniformly, x_t = (1 - sigma) x_0
  + sigma eps, the velocity eps - x_0 as the target; FLUX's latents packed inside the backbone's
  forward as FluxPipeline packs them).

FLOPs: every FLOP of one step, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the
step itself; for diffalign's cached step that is the denoiser alone (policy forward + backward,
reference forward), for the example it adds VAE and text encoding. MFU uses the denoiser FLOPs
(diffalign's count) for both, divided by the time per step and a stated peak: on CUDA the dense
bf16 peak of the GPU from its data sheet (:data:`GPU_PEAK_TFLOPS`, or ``--peak-tflops``); on CPU
the measured FLOP/s of a large fp32 matmul on this machine.

Each row runs ``--repeats`` times (3), in rounds over all rows so that a slow spell of a shared
machine hits every row alike; the median run by time per step is reported.

    python scripts/bench_train.py                         # tiny pipelines on CPU
    python scripts/bench_train.py --models sdxl --resolution 1024 --precision bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("diffalign", "diffalign+compile", "diffusers-example")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_pairs(path: Path, n: int, resolution: int, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    rows = {"caption": [f"a photo of thing number {i}" for i in range(n)], "jpg_0": [png() for _ in range(n)],
            "jpg_1": [png() for _ in range(n)], "label_0": [float(i % 2) for i in range(n)]}
    pq.write_table(pa.table(rows), path)
    return path


# dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's data sheets, by device-name substring
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "B200": 2250.0,
                   "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def gpu_peak_flops(name: str, override_tflops: float | None) -> float:
    """The dense bf16 FLOP/s that MFU divides by: ``override_tflops``, else the data-sheet figure for ``name``."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for part, tflops in GPU_PEAK_TFLOPS.items():  # the first match, so "H100 PCIe" is tried before "H100"
        if part in name:
            return tflops * 1e12
    raise SystemExit(f"no bf16 peak known for {name!r}: pass --peak-tflops from its data sheet")


def cpu_peak_flops() -> float:
    """FLOP/s of a 2048^3 fp32 matmul on this machine (the CPU 'peak' MFU divides by)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    started = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - started)


def _config(args, data: Path, out: Path, cache: Path):
    from diffalign.train import load_config

    return load_config(None, [
        f"model.path={ROOT / 'assets/models' / args['model']}", "model.random_init=true",
        f"model.gradient_checkpointing={str(args['grad_ckpt']).lower()}",
        f"model.channels_last={str(args.get('channels_last', False)).lower()}",
        f"model.compile={str(args.get('compile', False)).lower()}",
        f"data.path={data}", f"data.resolution={args['resolution']}", f"data.cache_dir={cache}",
        f"train.batch_size={args['batch']}", f"train.max_steps={args['warmup'] + args['steps']}",
        f"train.lora_rank={args['lora_rank']}", f"train.mixed_precision='{args['precision']}'",
        "train.report_to=none", "train.checkpoint_every=0", "train.log_every=1000", "train.learning_rate=1e-5",
        f"train.reference_dtype={'fp32' if args['precision'] == 'no' else args['precision']}",
        f"output_dir={out}",
    ])


def run_diffalign(args: dict, data: Path, work: Path) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from diffalign.train.trainer import PreferenceTrainer

    trainer = PreferenceTrainer(_config(args, data, work / "run", work / "cache"))
    device = trainer.accelerator.device
    for step in range(args["warmup"]):  # fills the latent / prompt cache and warms kernels
        trainer._optimizer_step(step)
    flops = _count(FlopCounterMode, lambda: trainer._optimizer_step(args["warmup"]))
    _sync(device)
    started = time.perf_counter()
    for step in range(args["warmup"] + 1, args["warmup"] + 1 + args["steps"]):
        trainer._optimizer_step(step)
    _sync(device)
    return {"seconds_per_step": (time.perf_counter() - started) / args["steps"], "denoiser_flops": flops}


def _count(counter_cls, fn) -> float:
    counter = counter_cls(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def build_example_models(args: dict, device: torch.device):
    """The pipeline as diffusers' example builds it: frozen parts cast, LoRA added (see the module docstring)."""
    from diffusers.training_utils import cast_training_params

    from diffalign.diffusion import add_lora, backbone_for, load_pipeline, mixed_precision_dtype

    dtype = mixed_precision_dtype(args["precision"])
    pipe = load_pipeline(ROOT / "assets/models" / args["model"], random_init=True)
    backbone = backbone_for(pipe)
    unet = backbone.denoiser
    for name, module in backbone.frozen_components().items():
        module.requires_grad_(False).to(device, dtype=torch.float32 if name == "vae" else dtype)
    unet.requires_grad_(False).to(device, dtype=dtype)  # the example casts the frozen UNet first
    add_lora(unet, args["lora_rank"])
    if dtype == torch.float16:  # and upcasts the adapters to fp32 under fp16 only
        cast_training_params(unet, dtype=torch.float32)
    if args["grad_ckpt"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    return backbone


def example_step(backbone, pixels: torch.Tensor, captions: list[str], dtype: torch.dtype,
                 beta: float = 2500.0) -> dict[str, torch.Tensor]:
    """The example's forward and backward on winners-then-losers ``pixels``; returns what it logs."""
    from diffalign.diffusion import Conditioning

    unet, schedule = backbone.denoiser, backbone.scheduler
    batch = len(captions)
    # no autocast: the example runs the bf16/fp16 UNet on inputs cast to that dtype
    latents = backbone.encode_images(pixels).to(dtype)
    cond = backbone.encode_prompts(captions)  # then repeated for the loser half
    cond = Conditioning.cat([cond, cond])
    noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
    t = torch.randint(0, schedule.config.num_train_timesteps, (batch,), device=latents.device).repeat(2)
    if "FlowMatch" in type(schedule).__name__:  # diffusers' SD3/FLUX scripts: the training grid's sigmas
        sigma = schedule.sigmas[t.cpu()].to(latents).view(-1, 1, 1, 1)
        noisy, target, t = (1 - sigma) * latents + sigma * noise, noise - latents, schedule.timesteps[t.cpu()].to(latents)
    else:
        noisy, target = schedule.add_noise(latents, noise, t), noise
    pred = backbone.predict(noisy, t, cond, denoiser=unet)
    model_losses = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    model_w, model_l = model_losses.chunk(2)
    with torch.no_grad():
        unet.disable_adapters()
        ref_pred = backbone.predict(noisy, t, cond, denoiser=unet)
        unet.enable_adapters()
        ref_losses = (ref_pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        ref_w, ref_l = ref_losses.chunk(2)
    inside = beta * ((ref_w - ref_l) - (model_w - model_l))
    loss = -F.logsigmoid(inside).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in unet.parameters() if p.requires_grad], 1.0)
    return {"loss": loss.detach(), "raw_model_loss": model_losses.mean().detach(), "ref_loss": ref_losses.mean(),
            "implicit_acc": (inside > 0).float().mean()}


def run_example_loop(args: dict, data: Path, work: Path) -> dict:
    """The diffusers example's training loop (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffalign.data import PairDataset
    from diffalign.diffusion import mixed_precision_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = build_example_models(args, device)
    optimizer = torch.optim.AdamW([p for p in backbone.denoiser.parameters() if p.requires_grad], lr=1e-5)
    dataset = PairDataset(data, resolution=args["resolution"])
    examples = [dataset.example(i) for i in range(len(dataset))]

    def step(i: int) -> dict:
        batch = [examples[(i * args["batch"] + j) % len(examples)] for j in range(args["batch"])]
        # pixel_values: winners then losers, as the example's collate_fn concatenates them
        pixels = torch.cat([torch.stack([e.pixels[0] for e in batch]), torch.stack([e.pixels[1] for e in batch])])
        logs = example_step(backbone, pixels.to(device), [e.caption for e in batch],
                            mixed_precision_dtype(args["precision"]))
        optimizer.step()
        optimizer.zero_grad()
        return {k: v.item() for k, v in logs.items()}  # the example logs these every step

    for i in range(args["warmup"]):
        step(i)
    flops = _count(FlopCounterMode, lambda: step(args["warmup"]))
    _sync(device)
    started = time.perf_counter()
    for i in range(args["warmup"] + 1, args["warmup"] + 1 + args["steps"]):
        step(i)
    _sync(device)
    return {"seconds_per_step": (time.perf_counter() - started) / args["steps"], "denoiser_flops": flops}


def run_row(args: dict) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = synthetic_pairs(work / "pairs.parquet", args["batch"] * args["warmup"], args["resolution"])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        runner = run_diffalign if args["impl"] == "diffalign" else run_example_loop
        result = runner(args, data, work)
    result["pairs_per_s"] = args["batch"] / result["seconds_per_step"]
    if torch.cuda.is_available():
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {**args, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-sd15,tiny-sdxl", help="folders under assets/models")
    parser.add_argument("--modes", default="lora", help="lora and/or full (comma-separated)")
    parser.add_argument("--grad-ckpt", default="off", help="off, on, or both")
    parser.add_argument("--compile", action="store_true", help="also time diffalign with model.compile=true")
    parser.add_argument("--impls", help=f"which loops to time, comma-separated from {', '.join(IMPLS)} (default: "
                                        "diffalign and the example loop where diffusers has one, with --compile "
                                        "also diffalign+compile)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the median is reported")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="GPU dense bf16 peak; default: the data-sheet figure for the GPU's name (H100 SXM: 989)")
    parser.add_argument("--json", type=Path, default=Path("runs/bench_train.json"))
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return
    peak = gpu_peak_flops(torch.cuda.get_device_name(), args.peak_tflops) if torch.cuda.is_available() \
        else cpu_peak_flops()
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    chosen = args.impls.split(",") if args.impls else \
        ["diffalign", *["diffalign+compile"] * args.compile, "diffusers-example"]
    if unknown := set(chosen) - set(IMPLS):
        raise SystemExit(f"--impls: {', '.join(sorted(unknown))} unknown; choose from {', '.join(IMPLS)}")
    specs = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            for grad_ckpt in checkpointing:
                # diffusers ships the DPO example for SD1.5 and SDXL LoRA; flow models get its loop with their
                # own scripts' noising (module docstring)
                has_example = mode == "lora" and any(family in model for family in ("sd15", "sdxl", "sd3", "flux"))
                impls = [impl for impl in chosen if impl != "diffusers-example" or has_example]
                specs += [{"model": model, "impl": impl, "compile": impl.endswith("+compile"),
                           "lora_rank": args.lora_rank if mode == "lora" else 0,
                           "grad_ckpt": grad_ckpt, "batch": args.batch, "resolution": args.resolution,
                           "precision": args.precision, "steps": args.steps, "warmup": args.warmup}
                          for impl in impls]
    runs: list[list[dict]] = [[] for _ in specs]
    for _ in range(args.repeats):  # rounds over all rows, so slow spells of a shared machine hit every row
        for i, spec in enumerate(specs):
            row_spec = {**spec, "impl": spec["impl"].split("+")[0]}
            done = subprocess.run([sys.executable, __file__, "--row", json.dumps(row_spec)],
                                  capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"row {spec} failed")
            runs[i].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{spec['model']} ckpt={spec['grad_ckpt']} {spec['impl']}: {runs[i][-1]['pairs_per_s']:.2f} pairs/s",
                  file=sys.stderr)
    rows = []
    for i, spec in enumerate(specs):  # the median run by time per step; the largest peak memory of all runs
        ordered = sorted(runs[i], key=lambda r: r["seconds_per_step"])
        rows.append({**ordered[len(ordered) // 2], "impl": spec["impl"],
                     "peak_memory_gb": max(r["peak_memory_gb"] for r in runs[i]), "repeats": len(ordered)})
    for row in rows:  # MFU counts the denoiser's work, the same for every implementation of a row:
        # diffalign's cached step runs only the denoiser (uncompiled, where the counter sees every op);
        # the example's count adds VAE/text encoding, so without a diffalign row its MFU is left out
        same = [r for r in rows if r["impl"].startswith("diffalign") and r["model"] == row["model"]
                and r["grad_ckpt"] == row["grad_ckpt"] and r["lora_rank"] == row["lora_rank"]]
        same.sort(key=lambda r: r["impl"] != "diffalign")
        row["mfu"] = same[0]["denoiser_flops"] / row["seconds_per_step"] / peak if same else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{device}, torch {torch.__version__}, peak {peak / 1e12:.3f} TFLOP/s, batch {args.batch} pairs, "
          f"{args.resolution}px, precision {args.precision}\n")
    print("| model | mode | grad ckpt | impl | pairs/s | s/step | peak mem (GiB) | GFLOP/step (all ops) | MFU | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next((r for r in rows if r["impl"] == "diffusers-example" and r["model"] == row["model"]
                     and r["grad_ckpt"] == row["grad_ckpt"] and r["lora_rank"] == row["lora_rank"]), None)
        ratio = f"{row['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else "-"
        mode = "lora" if row["lora_rank"] else "full"
        print(f"| {row['model']} | {mode} | {row['grad_ckpt']} | {row['impl']} | {row['pairs_per_s']:.2f} | "
              f"{row['seconds_per_step']:.3f} | {row['peak_memory_gb']:.2f} | {row['denoiser_flops'] / 1e9:.1f} | "
              f"{'-' if row['mfu'] is None else format(row['mfu'], '.1%')} | {ratio} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "peak_flops": peak, "rows": rows},
                                    indent=2))


if __name__ == "__main__":
    main()
