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

The in-process comparison above is a profiling aid: it times the two structures' compute, not the authors' program.
``--flow-grpo PATH`` compares whole programs instead: Flow-GRPO's own ``scripts/train_sd3.py`` from a local checkout of
yifan123/flow_grpo (nothing of it is copied into this repository) against ``diffalign train configs/sd3_grpo.yaml``,
both on the same SD3-architecture weights (``--models``' first, random weights written to a local folder), the same
prompts (T5 embeddings of 128 tokens, as the script encodes them: the recipe's ``model.prompt_tokens``), rounds,
steps, LoRA, optimiser and reward, as separate processes, alternating A B A B (``--repeats`` each). Both sample the
same number of images at once, by default the most Flow-GRPO's script can (its training batch is its sampling batch,
so a round trained in S optimiser steps samples at most 1/S of it at once); a second diffalign row samples the whole
round at once, which diffalign's round driver can because it trains on micro-batches of its own size:

    pip install absl-py ml_collections wandb                         # what train_sd3.py imports
    python scripts/bench_online.py --flow-grpo ~/flow_grpo --models tiny-sd3 --resolution 64 --repeats 3

Its script runs from a copy with two lines changed, said in the output: the ``while True`` of its epochs stops after
``--rounds`` epochs, and its evaluation at epoch 0 is skipped (diffalign's run has no validation either). Its config
is written in its own format (ml_collections, from its ``config/base.py``). Each row: whole-process seconds (start to
exit, model loading included), in-loop seconds (from the first sampling bar to exit), images sampled per in-loop
second and optimiser steps per in-loop second; ``--kl 0.01`` turns the KL term on in both (Flow-GRPO's ``train.beta``,
diffalign's ``objective.options.kl_coef``), which adds the reference forward. Flow-GRPO's script reaches its reference
through the DDP wrapper, so the KL rows need ``--processes 2`` (both programs under torchrun, each process sampling
and training its share of the round; on a machine without CUDA with ``ACCELERATE_USE_CPU``, so both join a gloo group).
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


# the two lines of train_sd3.py the comparison changes, on a copy: stop after BENCH_EPOCHS epochs, no evaluation at epoch 0
SCRIPT_CHANGES = {
    "\n    while True:\n": '\n    while epoch < int(os.environ["BENCH_EPOCHS"]):\n',
    "\n        if epoch % config.eval_freq == 0:\n": "\n        if epoch % config.eval_freq == 0 and epoch > 0:\n",
}
DIFFALIGN = "diffalign train"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def flow_grpo_batch(args) -> int:
    """The images each process of Flow-GRPO's script samples at once: ``--sample-batch``, by default the most it can
    for the round's optimiser steps. Its training re-batches the round into batches of that size and steps the
    optimiser after whole batches, so a round of P images trained in S steps on N processes samples at most
    P / (S N) at once on each (8 for 4 x 4 in 2 steps on one process)."""
    per_round, processes = args.groups * args.group_size, args.processes
    batch = args.sample_batch or per_round // (args.steps_per_round * processes)
    if batch < 1 or per_round % (batch * args.steps_per_round * processes):
        raise SystemExit(f"--sample-batch {batch}: Flow-GRPO's script needs the round's {per_round} images to split "
                         f"into batches of it on each of {processes} process(es), a whole number of batches to each "
                         f"of its {args.steps_per_round} optimiser steps")
    return batch


def batches_per_step(args) -> int:
    """How many sampling batches each process trains in one optimiser step (Flow-GRPO's gradient accumulation over
    batches; diffalign accumulates as many micro-batches of the same units)."""
    return args.groups * args.group_size // (flow_grpo_batch(args) * args.steps_per_round * args.processes)


def patched_train_script(checkout: Path, work: Path) -> Path:
    """A copy of the checkout's scripts/train_sd3.py with :data:`SCRIPT_CHANGES`; refused when a line is not there."""
    text = (checkout / "scripts" / "train_sd3.py").read_text()
    for old, new in SCRIPT_CHANGES.items():
        if text.count(old) != 1:
            raise SystemExit(f"{checkout}/scripts/train_sd3.py does not have the line {old.strip()!r} once; this "
                             "comparison was written for yifan123/flow_grpo's script with it")
        text = text.replace(old, new)
    script = work / "train_sd3.py"
    script.write_text(text)
    return script


def flow_grpo_config(args, checkout: Path, weights: Path, prompts: Path, logs: Path) -> str:
    """A config file in Flow-GRPO's format (its config/base.py with the comparison's settings)."""
    per_round, batch = args.groups * args.group_size, flow_grpo_batch(args)
    return f'''import importlib.util

spec = importlib.util.spec_from_file_location("flow_grpo_base", {str(checkout / "config" / "base.py")!r})
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)


def get_config():
    config = base.get_config()
    config.seed, config.logdir, config.save_dir = 42, {str(logs)!r}, {str(logs)!r}
    config.save_freq = config.eval_freq = 10**9
    config.mixed_precision, config.use_lora, config.allow_tf32 = {args.precision!r}, True, True
    config.dataset, config.prompt_fn, config.resolution = {str(prompts)!r}, "general_ocr", {args.resolution}
    config.pretrained.model = {str(weights)!r}
    config.sample.num_steps = config.sample.eval_num_steps = {args.sample_steps}
    config.sample.guidance_scale, config.sample.noise_level = 4.5, 0.7
    config.sample.train_batch_size = config.sample.test_batch_size = {batch}
    config.sample.num_image_per_prompt = {args.group_size}
    config.sample.num_batches_per_epoch = {per_round // (batch * args.processes)}
    config.sample.global_std = True
    config.train.batch_size = {batch}
    config.train.gradient_accumulation_steps = {batches_per_step(args)}
    config.train.learning_rate, config.train.clip_range, config.train.beta = 3e-4, 1e-4, {args.kl}
    config.train.timestep_fraction, config.train.ema, config.train.cfg = 1.0, False, True
    config.reward_fn = {{"jpeg_compressibility": 1.0}}
    config.per_prompt_stat_tracking = True
    return config
'''


def diffalign_overrides(args, weights: Path, prompts: Path, out: Path, sample_groups: int) -> list[str]:
    """configs/sd3_grpo.yaml (Flow-GRPO's recipe, whose T5 prompts are 128 tokens as the script's) at the comparison's
    settings: every step trained, no EMA, ``sample_groups`` groups sampled at once; each optimiser step accumulates
    as many micro-batches as Flow-GRPO's does batches, each of the same (image, step) units."""
    accumulation = batches_per_step(args)
    return [f"model.path={weights}", "model.gradient_checkpointing=false", "objective.t_range=[0.0, 1.0]",
            f"objective.sample_steps={args.sample_steps}", f"objective.options.kl_coef={args.kl}",
            f"online.prompts={prompts / 'train.txt'}", f"online.groups_per_round={args.groups}",
            f"online.group_size={args.group_size}", f"online.sample_batch_size={sample_groups}",
            f"online.steps_per_round={args.steps_per_round}", "online.reward=jpeg_compressibility",
            f"data.resolution={args.resolution}", f"train.batch_size={flow_grpo_batch(args) * args.sample_steps}",
            f"train.gradient_accumulation={accumulation}", f"train.max_steps={args.rounds * args.steps_per_round}",
            f"train.mixed_precision={args.precision}", "train.ema_decay=0.0", "train.ema_every=1", "train.checkpoint_every=0",
            "train.report_to=none", f"train.lora_targets=[{', '.join(LORA_TARGETS)}]", "validation.every=0",
            f"output_dir={out}"]


def timed_process(command: list[str], env: dict, marker: str, cwd: Path) -> tuple[float, float]:
    """(seconds from start to exit, seconds from the first ``marker`` in its output to exit); a failed run stops the
    comparison with the end of its output."""
    import os
    import subprocess

    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    seen, marked = b"", None
    while chunk := os.read(process.stdout.fileno(), 65536):
        seen = (seen + chunk)[-20000:]
        if marked is None and marker.encode() in seen:
            marked = time.perf_counter()
    code = process.wait()
    ended = time.perf_counter()
    if code != 0 or marked is None:
        raise SystemExit(f"{' '.join(command[:3])} ... failed (exit {code}, marker {marker!r} "
                         f"{'seen' if marked else 'never seen'}):\n{seen.decode(errors='replace')[-3000:]}")
    return ended - started, ended - marked


def _phase_functions() -> dict[str, list[tuple[str, int, str]]]:
    """Each phase of a round as the (file, first line, name) keys of the functions it runs in, as cProfile names them:
    the top-level calls only, so that no phase counts a call twice."""
    import inspect

    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from PIL import Image
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    def key(function) -> tuple[str, int, str]:
        function = inspect.unwrap(function)
        return inspect.getsourcefile(function), inspect.getsourcelines(function)[1], function.__name__

    return {
        "denoiser forward": [key(SD3Transformer2DModel.forward)],
        "VAE decode": [key(AutoencoderKL.decode)],
        "text encoders": [key(CLIPTextModelWithProjection.forward), key(T5EncoderModel.forward)],
        "backward": [("~", 0, "<method 'run_backward' of 'torch._C._EngineBase' objects>")],
        "optimiser step": [key(torch.optim.AdamW.step)],
        "image writes": [key(Image.Image.save)],
    }


def phase_seconds(profile: Path) -> dict[str, float]:
    """Cumulative seconds of each phase of :func:`_phase_functions` in a cProfile file, and the whole run's."""
    import pstats

    stats = pstats.Stats(str(profile)).stats
    phases = _phase_functions()
    out = {phase: sum(stats[k][3] for k in keys if k in stats) for phase, keys in phases.items()}
    out["denoiser forward calls"] = sum(stats[k][1] for k in phases["denoiser forward"] if k in stats)
    out["total"] = max(v[3] for v in stats.values())
    return out


def compare_with_flow_grpo(args) -> None:
    """Flow-GRPO's train_sd3.py against diffalign train, whole processes, alternating (module docstring)."""
    import os
    import shutil
    import sys

    from diffalign.diffusion import load_pipeline
    from diffalign.eval.prompts import read_prompts

    if args.kl > 0 and args.processes == 1:
        raise SystemExit("--kl above 0 needs --processes 2 or more: Flow-GRPO's script reaches its reference through "
                         "transformer.module.disable_adapter(), and .module exists only when accelerate wraps the model "
                         "in DDP")
    checkout = args.flow_grpo.expanduser().resolve()
    model = args.models.split(",")[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = work / "weights"
        # stored in the run's precision: a real-size architecture's random weights are half the disk in bf16
        stored = torch.bfloat16 if args.precision == "bf16" else None
        load_pipeline(_model_path(model), random_init=True, torch_dtype=stored).save_pretrained(weights)
        prompts = work / "prompts"
        prompts.mkdir()
        lines = read_prompts("general")[:32]
        (prompts / "train.txt").write_text("\n".join(lines) + "\n")
        (prompts / "test.txt").write_text("\n".join(lines[:flow_grpo_batch(args)]) + "\n")
        config = work / "flow_grpo_config.py"
        config.write_text(flow_grpo_config(args, checkout, weights, prompts, work / "logs"))
        script = patched_train_script(checkout, work)
        env = {**os.environ, "PYTHONPATH": str(checkout), "WANDB_MODE": "disabled", "BENCH_EPOCHS": str(args.rounds),
               "TOKENIZERS_PARALLELISM": "false"}
        batch = flow_grpo_batch(args)
        # one process: plain python; several: torchrun on a free port, and on a machine without CUDA accelerate's
        # ACCELERATE_USE_CPU (what `accelerate launch --cpu` sets) so that both join one gloo group and wrap in DDP
        start = [sys.executable] if args.processes == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes)]
        if args.processes > 1 and not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"
        commands = {"flow_grpo train_sd3.py": ([*start, str(script), f"--config={config}"], "Epoch 0: sampling", checkout)}
        # diffalign samples whole groups: as many as Flow-GRPO's batch holds, then (its sampling batch is not its
        # training batch) each process's share of the round at once
        for groups in dict.fromkeys([max(1, batch // args.group_size), args.groups // args.processes]):
            name = DIFFALIGN if groups * args.group_size == batch else f"{DIFFALIGN}, {groups * args.group_size} sampled at once"
            commands[name] = ([*start, "-m", "diffalign", "train", str(ROOT / "configs" / "sd3_grpo.yaml"),
                               *diffalign_overrides(args, weights, prompts, work / "run", groups)], "round 0: sampling",
                              ROOT)
        if args.profile:
            import subprocess

            print(f"| phase (s, main thread) | {' | '.join(commands)} |\n|---|" + "---|" * len(commands))
            phases = {}
            for name, (command, _, cwd) in commands.items():
                shutil.rmtree(work / "run", ignore_errors=True)
                profile = work / f"{name.split()[0]}.prof"
                subprocess.run([command[0], "-m", "cProfile", "-o", str(profile), *command[1:]], env=env, cwd=cwd,
                               check=True, capture_output=True)
                phases[name] = phase_seconds(profile)
            for phase in [*_phase_functions(), "denoiser forward calls", "total"]:
                print(f"| {phase} | " + " | ".join(f"{phases[name][phase]:.{0 if 'calls' in phase else 1}f}"
                                                  for name in commands) + " |")
            return
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for repeat in range(args.repeats):
            for name, (command, marker, cwd) in commands.items():
                shutil.rmtree(work / "run", ignore_errors=True)  # each diffalign run starts afresh
                times[name].append(timed_process(command, env, marker, cwd))
                print(f"repeat {repeat}: {name}: {times[name][-1][0]:.1f} s whole, {times[name][-1][1]:.1f} s in the loop",
                      flush=True)
    images, steps = args.rounds * args.groups * args.group_size, args.rounds * args.steps_per_round
    on = "" if args.processes == 1 else f" on {args.processes} processes"
    print(f"\n{model} ({args.resolution} px, {args.precision}), {args.rounds} rounds of {args.groups} prompts x "
          f"{args.group_size} images{on}, sampled {flow_grpo_batch(args)} at a time by each process (unless the row "
          "says otherwise), "
          f"{args.sample_steps} steps, {steps} optimiser steps, KL {args.kl}; medians of "
          f"{args.repeats}, alternating. Flow-GRPO's script changed on a copy: "
          + "; ".join(f"{old.strip()!r} -> {new.strip()!r}" for old, new in SCRIPT_CHANGES.items()) + "\n")
    print("| program | whole process (s) | in the loop (s) | images/s | optimiser steps/s |")
    print("|---|---|---|---|---|")
    rows = {}
    for name, runs in times.items():
        whole, loop = statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs)
        rows[name] = (whole, loop)
        print(f"| {name} | {whole:.1f} | {loop:.1f} | {images / loop:.2f} | {steps / loop:.3f} |")
    theirs_whole, theirs_loop = rows.pop("flow_grpo train_sd3.py")
    print()
    for name, (ours_whole, ours_loop) in rows.items():
        print(f"{name} vs Flow-GRPO's script: {theirs_whole / ours_whole:.2f}x whole process, "
              f"{theirs_loop / ours_loop:.2f}x in the loop")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "runs": {k: v for k, v in times.items()}}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="toy-base,tiny-sd3", help="folders under assets/models")
    parser.add_argument("--groups", type=int, default=4, help="prompts per round")
    parser.add_argument("--group-size", type=int, default=8, help="images per prompt")
    parser.add_argument("--sample-batch", type=int, help="images sampled at once (a multiple of the group size; 16). "
                        "--flow-grpo: Flow-GRPO's batch (by default the most its script can for --steps-per-round: "
                        "the round's images over the steps), also diffalign's in its first row")
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
    parser.add_argument("--flow-grpo", type=Path, metavar="PATH",
                        help="a local checkout of yifan123/flow_grpo: compare whole programs, its train_sd3.py against "
                             "diffalign train (module docstring)")
    parser.add_argument("--rounds", type=int, default=2, help="--flow-grpo: rounds (its epochs) each program runs")
    parser.add_argument("--steps-per-round", type=int, default=2, help="--flow-grpo: optimiser steps per round")
    parser.add_argument("--kl", type=float, default=0.0, help="--flow-grpo: the KL weight of both (0: off; Flow-GRPO's "
                        "script takes its reference from the DDP wrapper, so a KL above 0 needs --processes 2 or more)")
    parser.add_argument("--processes", type=int, default=1, help="--flow-grpo: processes each program runs on "
                        "(torchrun; each process samples and trains its share of the round)")
    parser.add_argument("--profile", action="store_true", help="--flow-grpo: run each program once under cProfile and "
                        "print the seconds of each phase (denoiser forwards, decoding, text encoders, backward, "
                        "optimiser, image writes; the main thread's: both score on a second thread) instead")
    args = parser.parse_args()
    if args.flow_grpo is not None:
        return compare_with_flow_grpo(args)
    args.sample_batch = args.sample_batch or 16
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
