"""What the methods that fine-tune through a differentiable reward's gradient share (DRaFT, AlignProp, ReFL): sampling
inside the loss, with gradients through some of the sampler's steps, then the reward of the decoded image.

No rounds are stored: each micro-batch is prompts and the noise their samples start from
(:mod:`diffalign.train.prompt_batches`), and the loss samples them with the policy, the recorded sampler's steps
(:class:`~diffalign.diffusion.logprob.StepRule`: the flow SDE or ODE on flow models, DDIM with eta elsewhere; eta 0 is
the deterministic sampler) and classifier-free guidance at ``objective.sample_guidance_scale``. The steps before
the method's first trained step run without gradients; the trained ones keep the graph, each model call checkpointed
(recomputed in the backward pass, ``checkpoint_steps``) so memory does not grow with the steps trained, as AlignProp
does. The final latent is decoded by the VAE (with gradients through it, its weights frozen), scored by the
differentiable rewards of ``online.reward`` (a weighted sum of their raw scores, ``online.reward_weights``), and the
method turns the score into a loss. Rewards that are not differentiable (the OCR engine, GenEval's detector, judges
and JPEG sizes) are refused before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffalign.config import ranged
from diffalign.diffusion import Backbone, Conditioning
from diffalign.diffusion.logprob import StepRule, guided_output
from diffalign.errors import UserError
from diffalign.objectives.base import OnlineObjective
from diffalign.rewards.video import score_media

Tensor = torch.Tensor


@dataclass
class RewardGradientOptions:
    # the loss is -reward_scale x reward (a method with its own loss says so)
    reward_scale: float = ranged(1.0, "(0, inf)")
    # recompute each trained step's model call in the backward pass instead of keeping its activations
    checkpoint_steps: bool = True


class RewardGradientObjective(OnlineObjective):
    """Fine-tuning through a reward's gradient; see the module docstring. A method says where its gradient starts
    (:meth:`first_trained_step`, from what it draws in :meth:`draw`) and may replace the sampling
    (:meth:`final_latents`) or the loss (:meth:`reward_loss`)."""

    samples_in_loss = True
    keeps_trajectories = False
    takes_labels = False
    shared_noise = False
    frozen_reference = False  # no KL: a full fine-tune keeps no copy of the base
    group_size = 1

    Options = RewardGradientOptions

    def __init__(self, config, backbone: Backbone) -> None:
        self.options = self.options_of(config)
        self.record_sampler(config, backbone)
        self.sample_steps = config.sample_steps
        self.rewards: list[tuple[Any, float]] = []

    @classmethod
    def build(cls, config, model: Any) -> "RewardGradientObjective":
        from diffalign.rewards import load_reward
        from diffalign.rewards.weighted import parse_weights, reward_specs

        objective = super().build(config, model)
        specs = reward_specs(config.online.reward)
        objective.rewards = list(zip((load_reward(spec) for spec in specs),
                                     parse_weights(len(specs), config.online.reward_weights)))
        return objective

    @classmethod
    def check_config(cls, config) -> None:
        from diffalign.rewards import REWARDS, RewardSpec
        from diffalign.rewards.weighted import reward_specs

        if config.online.reward_as != "score":
            raise UserError(f"{config.objective.name} follows the reward's gradient, and win rates "
                            "(online.reward_as=win_rate) have none: leave online.reward_as=score")
        super().check_config(config)
        if config.data.source_columns:
            raise UserError(f"{config.objective.name} samples inside its loss from text prompts alone; edits "
                            "(data.source_columns) train with the methods that sample rounds (grpo, nft, awm)")
        names = [RewardSpec.parse(spec).name for spec in reward_specs(config.online.reward)]
        fixed = [name for name in names if not getattr(REWARDS[name], "differentiable", False)]
        if fixed:
            able = sorted(name for name, cls_ in REWARDS.items() if getattr(cls_, "differentiable", False))
            raise UserError(f"{config.objective.name} follows the reward's gradient, and {', '.join(fixed)} has none "
                            f"(its score passes through something not differentiable); differentiable rewards: "
                            f"{', '.join(able)}. Train it with an online method that needs only scores (grpo, nft, "
                            "awm, dgpo)")

    # --- what a method decides -----------------------------------------------------------------
    def first_trained_step(self, randomness: dict[str, Tensor]) -> int:
        """The first of the sampler's steps whose model call keeps its gradient (the last K: T - K)."""
        raise NotImplementedError

    def reward_loss(self, reward: Tensor) -> Tensor:
        """(B,) rewards -> the scalar loss: -reward_scale x the mean reward."""
        return -self.options.reward_scale * reward.mean()

    # --- sampling with gradients ---------------------------------------------------------------
    def rule(self, backbone: Backbone, noise: Tensor) -> StepRule:
        return StepRule(backbone, self.sample_steps, self.eta, tuple(noise.shape[1:]), sampler=self.sampler)

    def model_output(self, backbone: Backbone, x: Tensor, t: Tensor, cond: Conditioning, policy: nn.Module,
                     trained: bool) -> Tensor:
        """The guided model output at (x, t): with gradients (checkpointed when ``checkpoint_steps``) when
        ``trained``, else without."""
        uncond = None if self.uncond is None else self.uncond.to(x.device).repeat_items(len(x))
        dtype = next(policy.parameters()).dtype
        run = lambda latents: guided_output(backbone, latents.to(dtype), t, cond.to(dtype=dtype),  # noqa: E731
                                            uncond if uncond is None else uncond.to(dtype=dtype),
                                            self.guidance_scale, policy).float()
        if not trained:
            with torch.no_grad():
                return run(x)
        if self.options.checkpoint_steps:
            return checkpoint(run, x, use_reentrant=False)
        return run(x)

    def sample(self, backbone: Backbone, rule: StepRule, x: Tensor, cond: Conditioning, policy: nn.Module,
               step_noise: Tensor, start: int, stop: int, first_trained: int) -> Tensor:
        """x after the sampler's steps [start, stop), each drawing its noise from ``step_noise`` (B, T, C, h, w);
        the model calls of steps >= ``first_trained`` keep their gradient."""
        for k in range(start, stop):
            trained = k >= first_trained
            output = self.model_output(backbone, x, rule.timesteps[k:k + 1].to(x.device), cond, policy, trained)
            noisy = rule.noisy(k)
            mean, std = rule.distribution(k, x, output, stochastic=noisy)
            x = mean + std.to(mean) * step_noise[:, k].float() if noisy else mean
            if not trained:
                x = x.detach()
        return x

    def final_latents(self, backbone: Backbone, noise: Tensor, cond: Conditioning, policy: nn.Module,
                      randomness: dict[str, Tensor]) -> Tensor:
        """(B, C, h, w) clean latents sampled from ``noise``, differentiable through the trained steps."""
        rule = self.rule(backbone, noise)
        first = self.first_trained_step(randomness)
        return self.sample(backbone, rule, noise.float(), cond, policy, randomness["step_noise"], 0,
                           self.sample_steps, first)

    def score(self, backbone: Backbone, latents: Tensor, prompts: list[str]) -> Tensor:
        """(B,) the weighted sum of the rewards' raw scores of the decoded latents (a clip's: over its frames),
        differentiable."""
        images = backbone.decode_latents(latents).float().add(1).div(2)
        total = 0.0
        for model, weight in self.rewards:
            total = total + weight * score_media(model, images, prompts, with_gradient=True).float().to(latents.device)
        return total

    def __call__(self, backbone: Backbone, latents: Tensor, cond: Conditioning, randomness: dict[str, Tensor],
                 policy: nn.Module, reference: nn.Module | None, *, prompts: list[str],
                 **targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        final = self.final_latents(backbone, latents[:, 0], cond, policy, randomness)
        reward = self.score(backbone, final, prompts)
        loss = self.reward_loss(reward)
        return loss, {"reward": reward.detach().mean(), "first_trained_step": torch.tensor(
            float(self.first_trained_step(randomness)))}
