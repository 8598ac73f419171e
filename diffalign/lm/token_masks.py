"""SparsePO's token mask model: a per-token weight in [0, inf) read from a frozen LM's hidden states.

Christopoulou et al. 2024 (SparsePO, arXiv 2410.05102) weigh each completion token's contribution to the
preference margin and to the KL term by masks that a small model predicts from the *reference* model's hidden
states, trained with the policy through the preference loss. This is their ``simple_all`` model (the one their
runs use): every transformer layer's hidden state goes through a LayerNorm shared by the layers, then its own
``Linear(hidden, 1)`` and a ReLU; a bias-free ``Linear(layers, 1)`` mixes the layers, and a ReLU keeps the mask
non-negative. Dropout follows each ReLU (0 by default: see :mod:`diffalign.objectives.lm_sparse_po`).

The per-layer linears start as the LM's own initialisation gives its linear layers (normal, std 0.02; zero
biases), which is how the authors' pipeline, built with the LM, gets them. The mixer starts at 1/L, the plain
average of the layers, where theirs starts random: with random signs, a model of few layers can start with the
mixer negative on every token, every mask at exactly 0 behind the final ReLU and no gradient to leave it (the toy
LM's 2 layers did, and trained nothing in 150 steps). The masks start small (about 0.05) and grow where tokens
matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Tensor = torch.Tensor


class TokenMaskModel(nn.Module):
    """(B, T) masks from the hidden states of ``layers`` transformer layers, each (B, T, hidden)."""

    def __init__(self, hidden_size: int, layers: int, *, layer_norm_eps: float = 1e-5, dropout: float = 0.0,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.per_layer = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(layers))
        self.mixer = nn.Linear(layers, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        for linear in self.per_layer:
            nn.init.normal_(linear.weight, std=init_std)
            nn.init.zeros_(linear.bias)
        nn.init.constant_(self.mixer.weight, 1.0 / layers)

    def forward(self, hidden_states: Sequence[Tensor]) -> Tensor:
        if len(hidden_states) != len(self.per_layer):
            raise ValueError(f"the mask model reads {len(self.per_layer)} layers' hidden states, got {len(hidden_states)}")
        dtype = self.mixer.weight.dtype
        per_layer = [self.dropout(torch.relu(linear(self.norm(h.to(dtype)))))
                     for linear, h in zip(self.per_layer, hidden_states)]
        return self.dropout(torch.relu(self.mixer(torch.cat(per_layer, dim=-1)))).squeeze(-1)


def mask_model_for(config, *, dropout: float = 0.0) -> TokenMaskModel:
    """A :class:`TokenMaskModel` for a transformers causal LM's config (its hidden size, layers and norm eps)."""
    hidden = config.get_text_config().hidden_size
    layers = config.get_text_config().num_hidden_layers
    eps = next((getattr(config, name) for name in ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps")
                if getattr(config, name, None) is not None), 1e-5)
    return TokenMaskModel(hidden, layers, layer_norm_eps=eps, dropout=dropout,
                          init_std=getattr(config, "initializer_range", 0.02))
