"""The batch source of the methods that fine-tune through a reward's gradient (DRaFT, AlignProp, ReFL): prompts and
the noise their samples start from, nothing stored.

Those methods sample inside the loss, with gradients through some of the sampler's steps, so there is no round to
sample ahead and no table to read: each micro-batch is ``train.batch_size`` prompts of ``online.prompts`` per process,
drawn at random with the starting noise and each step's noise of every sample. All of it is a pure function of
(seed, step, micro), so a resumed run draws exactly what the straight one would have.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.data import example_generator
from diffalign.diffusion import Backbone
from diffalign.eval.prompts import read_prompts

Tensor = torch.Tensor


def draw_samples(objective, n: int, latent_shape: tuple[int, ...], steps: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """n samples' starting noise (n, C, h, w), their sampler's step noise (n, steps, C, h, w) and what the method
    draws for them (:meth:`~diffalign.objectives.base.OnlineObjective.draw`), in that order from ``generator``."""
    noise = torch.randn((n, *latent_shape), generator=generator)
    step_noise = torch.randn((n, steps, *latent_shape), generator=generator)
    return noise, step_noise, objective.draw(n, latent_shape, generator)  # the method's own: where its gradient starts


class PromptBatches:
    """Prompts and starting noise per micro-batch; see the module docstring."""

    def __init__(self, config, backbone: Backbone, accelerator, objective) -> None:
        self.config, self.backbone, self.accelerator, self.objective = config, backbone, accelerator, objective
        self.prompts = read_prompts(config.online.prompts)

    def micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        """This process's prompts (their conditioning) and, per sample, its starting noise ``latents`` (B, 1, C, h,
        w), its sampler's step noise ``randomness["step_noise"]`` (B, T, C, h, w), and what the objective draws
        (:meth:`~diffalign.objectives.base.OnlineObjective.draw`)."""
        tc, acc = self.config.train, self.accelerator
        global_batch = tc.batch_size * acc.num_processes
        g = example_generator(tc.seed, step, micro, 2)
        chosen = torch.randint(0, len(self.prompts), (global_batch,), generator=g)
        shape = self.backbone.latent_shape(self.config.data.resolution, self.config.data.width)
        noise, step_noise, extra = draw_samples(self.objective, global_batch, shape, self.config.objective.sample_steps,
                                                g)
        mine = slice(acc.process_index * tc.batch_size, (acc.process_index + 1) * tc.batch_size)
        prompts = [self.prompts[int(i)] for i in chosen[mine]]
        device = acc.device
        return {"latents": noise[mine, None].to(device), "cond": self.backbone.encode_prompts(prompts).to(device),
                "randomness": {"step_noise": step_noise[mine].to(device), **{k: v[mine].to(device) for k, v in extra.items()}},
                "targets": {"prompts": prompts}, "logged": {}}
