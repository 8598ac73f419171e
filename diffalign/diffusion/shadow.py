"""A second set of values for a denoiser's trained weights: an EMA teacher or a frozen snapshot.

Self-NPO's teacher is an exponential moving average of the student; DDO's reference is the
policy as it was when the round began. Both are "the same network with other values for the
trained parameters", so instead of a second copy of the whole model, :class:`ShadowWeights`
keeps only the trained tensors (the LoRA weights in a LoRA run) and runs the live module with
them swapped in through :func:`torch.func.functional_call`: no copy of the frozen base, no
copying in and out per forward, and the live weights are never touched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

Tensor = torch.Tensor


class ShadowWeights:
    """Detached copies of ``module``'s trainable parameters, updated by EMA or reset to the live values.

    Has ``state_dict``/``load_state_dict`` so the trainer saves it in every checkpoint and a
    resumed run continues with the same teacher or reference.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the module has no trainable parameters to shadow")
        self.tensors = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}

    def _live(self) -> list[Tensor]:
        live = dict(self.module.named_parameters())
        return [live[name].detach() for name in self.names]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """shadow <- decay * shadow + (1 - decay) * live (decay 0: a snapshot of the live weights)."""
        shadow = [self.tensors[name] for name in self.names]
        live = [t.to(s.dtype) for t, s in zip(self._live(), shadow)]
        torch._foreach_lerp_(shadow, live, 1.0 - decay)

    def denoiser(self) -> nn.Module:
        """The module as a denoiser that runs with the shadow values, without gradients."""
        return _ShadowedModule(self.module, self.tensors)

    def state_dict(self) -> dict[str, Tensor]:
        return {name: t.cpu() for name, t in self.tensors.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"shadow weights checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        for name in self.names:
            self.tensors[name].copy_(state[name])


class _ShadowedModule(nn.Module):
    """``module`` called with the shadow tensors in place of its trainable parameters (no grad)."""

    def __init__(self, module: nn.Module, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self.live = module
        self.tensors = tensors

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # config, dtype, device, ... are the live module's
            return getattr(super().__getattr__("live"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return functional_call(self.live, self.tensors, args, kwargs, strict=False)
