"""What the trainer may ask of any objective, with the defaults most objectives need."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from diffalign.diffusion import Backbone, DiffusionSchedule, schedule_for
from diffalign.errors import UserError


class Objective:
    """Base of the objectives: the data layout, whether a frozen reference is needed, and two hooks.

    ``dataset`` names what the trainer loads: "pairs", "ranked", "images", "labelled_images" (one
    image with a binary label per row) or "online" (rounds sampled during training).
    ``frozen_reference`` False tells a full fine-tune not to keep a frozen copy of the base, for
    objectives that never compare with it. ``shadow_weights``
    True marks objectives that also run the bare denoiser with other values of its trained
    weights (an EMA teacher, a round's snapshot), which needs the whole weights on each process.
    """

    online = False
    dataset = "pairs"
    frozen_reference = True
    shadow_weights = False
    loss_kinds: tuple[str, ...] = ()
    # why the method walks a DDIM grid (an inversion, truncated sampling), for those that do: they need an
    # epsilon- or v-prediction model and refuse flow-matching ones (see :meth:`refuse_flow_matching`)
    walks_ddim_grid: str | None = None

    @classmethod
    def refuse_flow_matching(cls, name: str, backbone: Backbone) -> None:
        """A clear error when a method that walks a DDIM grid meets a flow-matching model (SD3, FLUX):
        there is no DDIM grid to walk, and the user can pick a method that has none."""
        if cls.walks_ddim_grid is None or isinstance(schedule_for(backbone.scheduler), DiffusionSchedule):
            return
        from diffalign.objectives import OBJECTIVES

        others = ", ".join(n for n, objective in OBJECTIVES.items() if objective.walks_ddim_grid is None)
        raise UserError(f"objective.name={name} {cls.walks_ddim_grid}, so it needs an epsilon- or v-prediction model "
                        f"(SD1.5, SDXL, PixArt); this model's {type(backbone.scheduler).__name__} is flow matching. "
                        f"With this model, train {others}.")

    @staticmethod
    def mean_over_processes(value: Tensor) -> Tensor:
        """The mean of ``value`` over the data-parallel processes, so a statistic of the batch (KTO's
        reference point, BCO's reward shift) is taken over the global batch. One process: ``value``;
        the trainer replaces this with its accelerator's reduction, which every process must call alike."""
        return value

    def attach(self, denoiser: nn.Module) -> list[Any]:
        """Called once with the trained denoiser; returns state to save in checkpoints (default none)."""
        return []

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step that was taken (default: nothing)."""
