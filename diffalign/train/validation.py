"""Validation samples during training: fixed prompts and seeds every N steps, a grid per
interval under ``samples/`` (a video model's: its clips' first frames, and an animated grid of every frame beside it), and the mean of each configured reward in ``validation.jsonl``, with the images'
statistics that drift when a run games its reward (``stat_<name>``, :mod:`diffalign.eval.image_stats`).
On N processes each samples and scores every N-th image; the main process writes grid and log."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from diffusers import DiffusionPipeline

from diffalign.diffusion.sampling import CLIP_FPS, generate
from diffalign.eval.image_stats import image_statistics
from diffalign.eval.prompts import read_prompts
from diffalign.eval.report import image_grid
from diffalign.rewards import load_reward
from diffalign.rewards.video import score_media
from diffalign.train.config import ValidationConfig
from diffalign.train.context_parallel import data_share
from diffalign.train.fsdp2 import lockstep_share


class Validator:
    def __init__(self, config: ValidationConfig, output_dir: Path, resolution: int, frames: int = 0,
                 width: int | None = None, prompt_tokens: int | None = None) -> None:
        """Samples at ``resolution`` x ``width`` pixels (height x width; ``width`` None: square), clips of ``frames``
        frames on a video model, its prompts encoded to ``prompt_tokens`` tokens as the run trains on them
        (``model.prompt_tokens``; None: the pipeline's own length)."""
        self.config = config
        self.pipeline_kwargs = {} if prompt_tokens is None else {"max_sequence_length": prompt_tokens}
        self.frames = frames  # a video model's clips (data.frames); 0 for images
        prompts = list(config.prompts) + (read_prompts(config.prompt_file) if config.prompt_file else [])
        self.prompts = [p for p in prompts for _ in range(config.images_per_prompt)]
        self.seeds = list(range(len(self.prompts)))
        self.rewards = [load_reward(name) for name in config.rewards]
        self.resolution, self.width = resolution, width
        self.samples = output_dir / "samples"
        self.log_path = output_dir / "validation.jsonl"

    @property
    def enabled(self) -> bool:
        return self.config.every > 0 and bool(self.prompts)

    def due(self, step: int, max_steps: int) -> bool:
        return self.enabled and (step % self.config.every == 0 or step == max_steps)

    def grid_path(self, step: int) -> Path:
        """Where the grid of ``step``'s samples is written (by the main process)."""
        return self.samples / f"step-{step:07d}.png"

    def run(self, pipe: DiffusionPipeline, step: int, processes: PartialState, *,
            train_s: float | None = None, lockstep: bool = False, group: int = 1) -> dict[str, float]:
        """Sample and score this process's share (every N-th image), then on the main process save the grid
        and log (with ``train_s``, the run's training time so far without validations, when given); returns
        {"val_<reward>": mean over every image, "stat_<statistic>": the images' statistic} there, {} on the others.
        ``lockstep``: the denoiser is sharded, so every process samples as many images as the largest share
        (:func:`~diffalign.train.fsdp2.lockstep_share`) and drops its padding. ``group``: processes that sample each
        image together, a context-parallel group of consecutive ranks (:mod:`~diffalign.train.context_parallel`):
        a group takes a share, and its first process's copy of the images is kept."""
        share = data_share(processes.process_index, processes.num_processes, group)
        mine, own = lockstep_share(len(self.prompts), share.index, share.count)
        mine = mine if lockstep else mine[:own]
        done = []  # (index, 8-bit image, score per reward) of this process's images
        if mine:
            denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
            was_training = denoiser.training
            denoiser.eval()
            prompts = [self.prompts[i] for i in mine]
            images = generate(pipe, prompts, [self.seeds[i] for i in mine], steps=self.config.steps,
                              guidance_scale=self.config.guidance_scale, resolution=self.resolution, width=self.width,
                              frames=self.frames, **self.pipeline_kwargs)
            denoiser.train(was_training)
            mine, prompts, images = mine[:own], prompts[:own], images[:own]  # without the lockstep padding
            scores = {r.name: score_media(r, images, prompts).tolist() for r in self.rewards}
            as_bytes = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # what the grid keeps anyway
            done = [(i, as_bytes[k], {name: values[k] for name, values in scores.items()}) for k, i in enumerate(mine)]
        done = sorted(gather_object(done if share.first else []), key=lambda item: item[0])
        if not processes.is_main_process:
            return {}
        self.samples.mkdir(parents=True, exist_ok=True)
        images = torch.stack([image for _, image, _ in done]).float() / 255
        if images.dim() == 5:  # clips: the grid of every frame, animated, and the first frames' for the statistics
            grids = [image_grid({f"step {step}": images[:, :, f]}) for f in range(images.shape[2])]
            grids[0].save(self.grid_path(step).with_suffix(".webp"), save_all=True, append_images=grids[1:],
                          duration=round(1000 / CLIP_FPS), loop=0)
            images = images[:, :, 0]
        image_grid({f"step {step}": images}).save(self.grid_path(step))
        scores = {f"val_{r.name}": sum(s[r.name] for _, _, s in done) / len(done) for r in self.rewards}
        scores.update({f"stat_{name}": value for name, value in image_statistics(images, self.prompts).items()})
        with self.log_path.open("a") as f:
            timing = {} if train_s is None else {"train_s": train_s}
            f.write(json.dumps({"step": step, **timing, **scores}) + "\n")
        return scores
