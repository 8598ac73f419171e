"""One online round's speed: Flow-GRPO's images sampled per second and optimiser steps per second, diffalign's round
driver against a re-implementation of Flow-GRPO's loop structure at the same settings.

- ``diffalign``: the real trainer (``PreferenceTrainer``) on ``configs/toy_grpo.yaml``'s objective. The round
  driver samples the round's G groups of K images ``online.sample_batch_size`` groups at a time (each group
  from its own generator), decodes each batch and scores it on a second thread while the next batch samples,
  and writes the round to disk. Each optimiser step draws B (trajectory, denoising step) units, every unit at
  its own step, and runs them through the policy (with guidance) in one batched forward, and the reference
  (adapters disabled) in one more when the KL weight is above zero.
- ``flow-grpo-loop``: the structure of yifan123/flow_grpo's scripts/train_sd3.py. Sampling: batches of
  images, a guided forward per step, decode, the reward submitted to a thread pool. Training: for each
  batch of samples, for each trained denoising step, one forward of the batch at that step (and one of the
  reference), the clipped loss backpropagated per (batch, step); an optimiser step every
  ``accumulation x steps`` of them. The step arithmetic is diffalign's (:class:`StepRule`, equal to the
  authors' ``sde_step_with_logprob`` and DDPO's ``ddim_step_with_logprob`` by tests/test_logprob.py), so the
  rows differ only in how the work is batched and scheduled.

Both train the same (image, step) units per optimiser step: the loop's ``train_batch x sample_steps x
accumulation``, diffalign's ``train.batch_size = train_batch x sample_steps`` with the same accumulation.
The reward is DDPO's JPEG incompressibility (no weights to download). Each timing is the median of
``--repeats``.

    python scripts/bench_online.py                                   # toy base and tiny SD3 on CPU
    python scripts/bench_online.py --models sd35-medium --resolution 512 --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("diffalign", "flow-grpo-loop")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model_path(model: str) -> Path:
    return ROOT / "assets/models" / model


def _overrides(args, model: str, out: Path) -> list[str]:
    random_init = model != "toy-base"  # the toy base ships its weights; the config folders do not
    return [f"model.path={_model_path(model)}", f"model.random_init={str(random_init).lower()}",
            f"data.resolution={args.resolution}", f"objective.sample_steps={args.sample_steps}",
            "objective.t_range=[0.0, 1.0]", f"online.groups_per_round={args.groups}",
            f"online.group_size={args.group_size}", f"online.sample_batch_size={args.sample_batch // args.group_size}",
            f"online.steps_per_round={args.train_steps + 1}", "online.reward=jpeg_incompressibility",
            f"train.batch_size={args.train_batch * args.sample_steps}", f"train.gradient_accumulation={args.accumulation}",
            f"train.max_steps={args.train_steps + 1}", f"train.lora_rank={args.lora_rank}",
            f"train.mixed_precision='{args.precision}'", "train.checkpoint_every=0", "train.report_to=none",
            "validation.every=0", f"output_dir={out}"]


def run_diffalign(args, model: str, work: Path) -> dict:
    """Seconds to sample and score one round, and per optimiser step, through the trainer."""
    from diffalign.train import load_config
    from diffalign.train.trainer import PreferenceTrainer

    trainer = PreferenceTrainer(load_config(ROOT / "configs/toy_grpo.yaml", _overrides(args, model, work / "run")))
    device = trainer.accelerator.device
    rounds = []
    for r in range(args.repeats):  # round 0 is the one trained below
        _sync(device)
        started = time.perf_counter()
        trainer.rounds.write(r)
        _sync(device)
        rounds.append(time.perf_counter() - started)
    trainer._optimizer_step(0)  # warm-up
    steps = []
    for step in range(1, args.train_steps + 1):
        _sync(device)
        started = time.perf_counter()
        trainer._optimizer_step(step)
        _sync(device)
        steps.append(time.perf_counter() - started)
    return {"seconds_per_round": statistics.median(rounds), "seconds_per_step": statistics.median(steps)}


def run_flow_grpo_loop(args, model: str) -> dict:
    """The same round and steps in Flow-GRPO's loop structure (see the module docstring)."""
    from diffalign.diffusion import Conditioning, add_lora, backbone_for, load_pipeline
    from diffalign.diffusion.logprob import StepRule, gaussian_log_prob
    from diffalign.eval.prompts import read_prompts
    from diffalign.objectives.grpo import clipped_surrogate, group_advantages
    from diffalign.rewards import load_reward

    device = torch.device(args.device)
    pipe = load_pipeline(_model_path(model), random_init=model != "toy-base")
    backbone = backbone_for(pipe)
    for module in backbone.frozen_components().values():
        module.requires_grad_(False).to(device)
    denoiser = backbone.denoiser.requires_grad_(False).to(device)
    add_lora(denoiser, args.lora_rank)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    reward = load_reward("jpeg_incompressibility")
    shape = backbone.latent_shape(args.resolution)
    rule = StepRule(backbone, args.sample_steps, 1.0, shape)
    prompts = read_prompts("toy_train")[:args.groups]
    all_prompts = [p for p in prompts for _ in range(args.group_size)]
    guidance = 5.0

    def guided(x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):  # as the trainer
            both = backbone.predict(torch.cat([x, x]), t.expand(2 * len(x)).to(device), Conditioning.cat([uncond, cond]))
        unconditional, conditional = both.float().chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    def sample_round() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents, log_probs, scored = [], [], []
        with torch.no_grad(), ThreadPoolExecutor(max_workers=1) as executor:
            for start in range(0, len(all_prompts), args.sample_batch):
                batch = all_prompts[start:start + args.sample_batch]
                cond, uncond = backbone.encode_prompts(batch), backbone.encode_prompts([""] * len(batch))
                x = torch.randn(len(batch), *shape, device=device)
                path, steps = [x], []
                for k, t in enumerate(rule.timesteps):
                    mean, std = rule.distribution(k, x, guided(x, t, cond, uncond))
                    x = mean + std.to(mean) * torch.randn_like(mean)
                    steps.append(gaussian_log_prob(x, mean, std))
                    path.append(x)
                images = backbone.decode_latents(x).float().cpu().add(1).div(2)
                scored.append(executor.submit(reward, images, batch))
                latents.append(torch.stack(path, 1))
                log_probs.append(torch.stack(steps, 1))
            rewards = torch.cat([future.result() for future in scored])
        return torch.cat(latents), torch.cat(log_probs), rewards

    rounds = []
    for _ in range(args.repeats):
        _sync(device)
        started = time.perf_counter()
        latents, old_log_probs, rewards = sample_round()
        _sync(device)
        rounds.append(time.perf_counter() - started)
    advantages = group_advantages(rewards, all_prompts).to(device).clamp(-5, 5)

    def optimiser_step(first: int) -> None:
        """accumulation batches of train_batch samples, each at every denoising step: one backward per (batch, step)."""
        micro = args.accumulation * args.sample_steps
        for a in range(args.accumulation):
            rows = [(first + a * args.train_batch + i) % len(latents) for i in range(args.train_batch)]
            cond = backbone.encode_prompts([all_prompts[i] for i in rows])
            uncond = backbone.encode_prompts([""] * len(rows))
            for k, t in enumerate(rule.timesteps):
                x, nxt = latents[rows, k], latents[rows, k + 1]
                mean, std = rule.distribution(k, x, guided(x, t, cond, uncond))
                log_prob = gaussian_log_prob(nxt, mean, std)
                loss = clipped_surrogate(log_prob - old_log_probs[rows, k], advantages[rows], 1e-4).mean()
                with torch.no_grad():
                    denoiser.disable_adapters()
                    ref_mean, _ = rule.distribution(k, x, guided(x, t, cond, uncond))
                    denoiser.enable_adapters()
                kl = ((mean - ref_mean) ** 2).flatten(1).mean(dim=1) / (2 * std ** 2)
                ((loss + 0.01 * kl.mean()) / micro).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    optimiser_step(0)  # warm-up
    steps = []
    for step in range(1, args.train_steps + 1):
        _sync(device)
        started = time.perf_counter()
        optimiser_step(step * args.accumulation * args.train_batch)
        _sync(device)
        steps.append(time.perf_counter() - started)
    return {"seconds_per_round": statistics.median(rounds), "seconds_per_step": statistics.median(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="toy-base,tiny-sd3", help="folders under assets/models")
    parser.add_argument("--groups", type=int, default=4, help="prompts per round")
    parser.add_argument("--group-size", type=int, default=8, help="images per prompt")
    parser.add_argument("--sample-batch", type=int, default=16, help="images sampled at once (a multiple of the group size)")
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--train-batch", type=int, default=2, help="trajectories per micro-batch of the loop")
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=3, help="optimiser steps timed (after one warm-up)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="rounds sampled; the median is reported")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.sample_batch % args.group_size:
        raise SystemExit("--sample-batch must be a multiple of --group-size (the driver samples whole groups)")
    rows = []
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as work:
            timings = {"diffalign": run_diffalign(args, model, Path(work)), "flow-grpo-loop": run_flow_grpo_loop(args, model)}
        images = args.groups * args.group_size
        units = args.train_batch * args.sample_steps * args.accumulation
        for impl in IMPLS:
            t = timings[impl]
            rows.append({"model": model, "impl": impl, "device": args.device, "images_per_round": images,
                         "units_per_step": units, "images_per_s": images / t["seconds_per_round"],
                         "steps_per_s": 1 / t["seconds_per_step"], "units_per_s": units / t["seconds_per_step"]})
    print(f"\nOne Flow-GRPO round on {args.device}: {args.groups} prompts x {args.group_size} images, "
          f"{args.sample_steps} steps, {args.resolution} px; {rows[0]['units_per_step']} (image, step) units per "
          "optimiser step\n")
    print("| model | impl | images/s | train steps/s | units/s | vs loop (images, steps) |")
    print("|---|---|---|---|---|---|")
    loop = {row["model"]: row for row in rows if row["impl"] == "flow-grpo-loop"}
    for row in rows:
        base = loop[row["model"]]
        print(f"| {row['model']} | {row['impl']} | {row['images_per_s']:.2f} | {row['steps_per_s']:.3f} | "
              f"{row['units_per_s']:.1f} | {row['images_per_s'] / base['images_per_s']:.2f}x, "
              f"{row['steps_per_s'] / base['steps_per_s']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
