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
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
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
        sharded = any(isinstance(t, DTensor) for t in self.tensors.values())
        return (_SwappedModule if sharded else _ShadowedModule)(self.module, self.tensors)

    def state_dict(self) -> dict[str, Tensor]:
        # sharded values stay sharded: the checkpoint gathers them (diffalign.train.run_state.ExtraState)
        return {name: t if isinstance(t, DTensor) else t.cpu() for name, t in self.tensors.items()}

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


class _SwappedModule(_ShadowedModule):
    """``module`` run with the shadow values copied into its own weights for the forward, and its values copied back
    after (no grad). Under FSDP2 (:mod:`diffalign.train.fsdp2`) each block gathers its weights from its own shards,
    so :func:`~torch.func.functional_call`'s swap of the parameters would not be seen; each process copies its shard
    of the shadow values in, which costs one more copy of its shard of the trained weights. Weights gathered before
    (FSDP2 keeps the root module's gathered from its forward to its backward) are dropped before and after, so this
    forward gathers the shadow values and the next one, or a pending backward, the live values again."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = dict(self.live.named_parameters())
        with torch.no_grad():
            kept = {name: live[name].to_local().clone() for name in self.tensors}
            _reshard(self.live)
            for name, value in self.tensors.items():
                live[name].to_local().copy_(value.to_local())
            try:
                return self.live(*args, **kwargs)
            finally:
                _reshard(self.live)
                for name, value in kept.items():
                    live[name].to_local().copy_(value)


def _reshard(module: nn.Module) -> None:
    """Free every gathered weight of an FSDP2-sharded ``module``: the next forward or backward gathers from the shards."""
    for part in module.modules():
        if isinstance(part, FSDPModule):
            part.reshard()
