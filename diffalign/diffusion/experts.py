"""Both experts of a two-expert model (Wan2.2 A14B) trained in one run: one module that denoises each item with the
expert its pipeline switches to at the item's timestep (``transformer`` at or above the boundary, ``transformer_2``
below it), so the trainer, its DDP wrapper, the optimiser and the checkpoints see one module whose parameters are
both experts' (each with its own LoRA), and a reference with the adapters disabled is both bases."""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


class ExpertPair(nn.Module):
    """``high`` (the pipeline's ``transformer``) and ``low`` (its ``transformer_2``), switched at ``boundary`` (a
    timestep, sigma x 1000). Called as the experts are (``hidden_states``, ``timestep`` of shape (N,), the rest by
    keyword); each item goes to its expert, and the outputs come back in the items' order."""

    ATTRS = {"high": "transformer", "low": "transformer_2"}  # each expert's pipeline component

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float) -> None:
        super().__init__()
        self.high, self.low, self.boundary = high, low, boundary

    @property
    def config(self):
        """The experts' shared architecture settings (the high-noise expert's config)."""
        return self.high.config

    def experts(self) -> tuple[nn.Module, nn.Module]:
        """The high-noise expert, then the low-noise one."""
        return self.high, self.low

    def forward(self, hidden_states: Tensor, timestep: Tensor, return_dict: bool = False, **inputs) -> tuple[Tensor]:
        """Each item through its expert; ``return_dict`` is accepted as the experts take it, and the output is
        always the tuple ``return_dict=False`` gives. Under gradients an expert no item reached still joins the
        output with a zero (its trained parameters get zero gradients), so that DDP, which waits for every trained
        parameter's gradient, does not stall on a batch of one expert's timesteps."""
        high = timestep >= self.boundary
        parts, idle = [], []
        for chosen, expert in ((high, self.high), (~high, self.low)):
            rows = chosen.nonzero().squeeze(1)  # indices, not a mask: shapes a fake tensor can follow
            if not len(rows):
                idle.append(expert)
                continue
            on = rows.to(hidden_states.device)
            picked = {key: value.index_select(0, on) if isinstance(value, Tensor) else value
                      for key, value in inputs.items()}
            parts.append((rows, expert(hidden_states.index_select(0, on), timestep[rows], return_dict=False,
                                       **picked)[0]))
        order = torch.cat([rows for rows, _ in parts]).argsort()
        out = torch.cat([out for _, out in parts]).index_select(0, order.to(hidden_states.device))
        unused = [p for expert in idle for p in expert.parameters() if p.requires_grad] if torch.is_grad_enabled() \
            else []
        if unused:
            out = out + 0.0 * sum(p.reshape(-1)[0] for p in unused)
        return (out,)

    @property
    def _no_split_modules(self) -> list[str]:
        return list(getattr(self.high, "_no_split_modules", None) or [])

    # what the trainer asks of a denoiser, done to each expert
    def add_adapter(self, config, adapter_name: str = "default") -> None:
        for expert in self.experts():
            expert.add_adapter(config, adapter_name=adapter_name)

    def enable_gradient_checkpointing(self) -> None:
        for expert in self.experts():
            expert.enable_gradient_checkpointing()

    def enable_xformers_memory_efficient_attention(self) -> None:
        for expert in self.experts():
            expert.enable_xformers_memory_efficient_attention()
