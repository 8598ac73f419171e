"""The previous round's policy as an online objective's reference: pi_t of the self-play loops, DDO's p_ref.

Self-play methods train pi_{t+1} against pi_t, the policy as it was when round t began. The round
driver samples round t at its first optimiser step, so pi_t is also the policy that drew the round.
It is kept as :class:`~diffalign.diffusion.shadow.ShadowWeights` (only the trained tensors, run through
the live module), moved to the policy every ``online.steps_per_round`` optimiser steps, and saved in
every checkpoint, so a resumed run continues with the same pi_t.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from diffalign.diffusion.shadow import ShadowWeights


class PreviousRoundReference:
    """Mixin of an :class:`~diffalign.objectives.base.OnlineObjective`: ``previous_round`` is pi_t, which also
    samples the rounds. The trainer's hooks (``attach``, ``after_optimizer_step``) keep it; objectives that
    use it set ``shadow_weights = True``."""

    reference_weights: ShadowWeights | None = None
    optimizer_steps = 0

    def attach(self, denoiser: nn.Module) -> list[Any]:
        self.reference_weights = ShadowWeights(denoiser)
        self.optimizer_steps = 0
        return [*super().attach(denoiser), self]

    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.optimizer_steps += 1
        if self.optimizer_steps % self.steps_per_round == 0:  # a new round: pi_t becomes the policy
            self.reference_weights.update(0.0)

    def previous_round(self) -> nn.Module:
        """pi_t, the policy as it was when this round began (no gradients)."""
        return self.reference_weights.denoiser()

    def round_index(self) -> int:
        """The round being trained (for logging)."""
        return self.optimizer_steps // self.steps_per_round

    def sampling_denoiser(self) -> nn.Module:
        """The rounds are pi_t's samples."""
        return self.previous_round()

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference_weights.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference_weights.load_state_dict(state["reference"])
        self.optimizer_steps = int(state["optimizer_steps"])
