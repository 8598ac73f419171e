"""Distillation of a diffusion model from a teacher (``model.teacher``): the student's prediction matched to the
teacher's on the same noised image.

BK-SDM (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion", arXiv 2305.15798,
its distillation section) trains a student denoiser with the task loss plus output-level knowledge distillation:
``L = L_task + lambda_out L_outKD`` with ``L_task = ||eps - eps_S(z_t, y, t)||^2`` (the usual denoising loss on the
data) and ``L_outKD = ||eps_T(z_t, y, t) - eps_S(z_t, y, t)||^2`` (the teacher's prediction at the same noised
latent z_t, caption y and timestep t), both per element and averaged; here ``L = L_outKD + task_weight * L_task``
(BK-SDM's weights 1 and 1 are ``task_weight = 1``). Its third term, feature-level KD between matching U-Net blocks,
depends on how the student's blocks map onto the teacher's and is not built. The prediction is whatever the model
predicts (epsilon, v, or a flow velocity), the teacher's and the student's alike.

With ``teacher_guidance_scale = w != 1`` the teacher's output is its classifier-free guided one,
``uncond + w (cond - uncond)``: the first stage of guidance distillation (Meng et al. 2023, "On Distillation of
Guided Diffusion Models", arXiv 2210.03142), which trains a student that samples at guidance 1 (one denoiser call a
step instead of two) as the teacher does at w, for one fixed w (the paper's student also takes w as an input).

The student is ``model.path`` as loaded (a LoRA or the whole denoiser), the teacher ``model.teacher``: a diffusers
folder or a finished run of the same pipeline class, whose denoiser alone is kept (frozen, in
``train.reference_dtype``), since the two must share the VAE's latents and the text encoders' conditioning. Data:
captioned images (``data.path`` in the ``images`` layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffalign.config import ranged
from diffalign.diffusion import Backbone, Conditioning
from diffalign.diffusion.finetuned import load_frozen_denoiser
from diffalign.diffusion.logprob import guided_output
from diffalign.errors import UserError
from diffalign.objectives.offline import NoisedDataObjective

Tensor = torch.Tensor


@dataclass
class DiffusionDistillOptions:
    # the weight of the denoising loss on the data beside the distillation term (BK-SDM's lambda: 1; 0 distils only)
    task_weight: float = ranged(1.0, "[0, inf)")
    # the teacher's classifier-free guidance scale (1 = its plain prediction; w > 1 distils the guided teacher into a
    # student that samples at guidance 1, Meng et al.'s first stage)
    teacher_guidance_scale: float = ranged(1.0, "[0, inf)")


class DiffusionDistill(NoisedDataObjective):
    """A student denoiser's prediction regressed onto a frozen teacher's; see the module docstring."""

    paper = "BK-SDM (Kim et al. 2023, arXiv 2305.15798) output KD; guidance distillation (Meng et al. 2023)"

    dataset = "images"
    frozen_reference = False
    reads_teacher = True
    loss_kinds = ("regression",)
    own_losses = ("output_kd",)

    Options = DiffusionDistillOptions

    def __init__(self, config, backbone: Backbone, teacher: nn.Module | None = None) -> None:
        super().__init__(config, backbone)
        options = self.options_of(config)
        self.task_weight, self.guidance_scale = options.task_weight, options.teacher_guidance_scale
        self.guides = self.guidance_scale != 1.0
        self.uncond = backbone.empty_prompt() if self.guides else None
        self.teacher = teacher

    @classmethod
    def build(cls, config, backbone: Backbone) -> "DiffusionDistill":
        """Loads ``model.teacher``'s denoiser (:func:`diffalign.diffusion.finetuned.load_frozen_denoiser`) beside the
        student's, on its device."""
        device = next(backbone.denoiser.parameters()).device
        teacher = load_frozen_denoiser(config.model.teacher, backbone, device, config.train.reference_dtype,
                                       what="model.teacher", same_config=False)
        return cls(config.objective, backbone, teacher)

    @classmethod
    def check_config(cls, config) -> None:
        if not config.model.teacher:
            raise UserError("diffusion_distill distils a student from a teacher: set model.teacher to a diffusers "
                            "folder or a finished run of the student's pipeline")

    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, **targets: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Mean ``L_outKD + task_weight L_task`` over the batch and detached metrics; ``latents`` (B, 1, C, h, w)."""
        group = self.noise(backbone, latents, cond, randomness)
        dtype = next(policy.parameters()).dtype
        x_t, t, cond = group.noisy.to(dtype), group.model_timesteps, group.cond.to(dtype=dtype)
        student = backbone.predict(x_t, t, cond, denoiser=policy).float()
        with torch.no_grad():
            frozen = next(self.teacher.parameters()).dtype
            uncond = None if self.uncond is None else self.uncond.to(device=x_t.device,
                                                                      dtype=frozen).repeat_items(len(x_t))
            teacher = guided_output(backbone, x_t.to(frozen), t, cond.to(dtype=frozen), uncond, self.guidance_scale,
                                    self.teacher).float()
        distill = (student - teacher).pow(2).mean()
        task = (student - group.target.float()).pow(2).mean()
        metrics = {"output_kd": distill.detach(), "task_loss": task.detach(),
                   "teacher_task_loss": (teacher - group.target.float()).pow(2).mean()}
        return distill + self.task_weight * task, metrics
