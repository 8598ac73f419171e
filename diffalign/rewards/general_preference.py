"""A general preference model (GPM; Zhang et al. 2024, "Beyond Bradley-Terry Models: A General Preference Model
for Language Model Alignment", arXiv 2410.02197, Sec. 3-4): preference embeddings on a sequence model, which can
represent cyclic (intransitive) preferences that no scalar reward can.

Each completion y of a prompt x is embedded as v(y | x) in R^{2k}: a linear head (no bias) on the sequence model's
last hidden state at the completion's last token, L2-normalised. Two completions are compared through a
skew-symmetric block-diagonal operator R(x) with 2 x 2 blocks [[0, -l_i], [l_i, 0]]:

    s(y_a beats y_b | x) = v_a^T R(x)^T v_b = sum_i l_i (v_a[2i] v_b[2i+1] - v_a[2i+1] v_b[2i]),

so s(a, b) = -s(b, a) and s(a, a) = 0, and P(y_a beats y_b | x) = sigma(s / tau). The block weights l_i are a
softmax of a second head on the prompt's last hidden state (the paper's "eigenvalue scale gate"; without it every
l_i is 1). Trained on preference pairs with -log sigma(s(chosen, rejected) / tau), tau 0.1 (the authors'
``HighDimGeneralPreferenceLoss``). Read from the authors' code (general-preference/general-preference-model:
``gpm_example_usage.py``, ``general_preference/models/loss.py``); written anew here.

A model folder is the sequence model as ``save_pretrained`` writes it (a causal LM's folder works: its body is
read), its tokenizer, ``preference_head.safetensors`` (``value_head.weight``, optionally ``prompt_head.weight``) and
``preference_head.json`` (``dim``, ``tau``). ``online.reward=gpm:PATH`` gives ``lm_gpo`` each round's
(G, K, K) tables of s; :func:`train_general_preference` trains one on a pairs table
(``scripts/train_gpm.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffalign.errors import UserError
from diffalign.lm.tokenize import collate, tokenize_group
from diffalign.paths import find_locally

Tensor = torch.Tensor
HEAD_WEIGHTS, HEAD_CONFIG = "preference_head.safetensors", "preference_head.json"
PREFIX = "gpm:"


def preference_score(a: Tensor, b: Tensor, block_weights: Tensor) -> Tensor:
    """s(a beats b) for (..., 2k) embeddings and (..., k) block weights: sum_i l_i (a[2i] b[2i+1] - a[2i+1] b[2i])."""
    return (block_weights * (a[..., 0::2] * b[..., 1::2] - a[..., 1::2] * b[..., 0::2])).sum(dim=-1)


class GeneralPreferenceModel(nn.Module):
    """A sequence model with GPM's two heads; see the module docstring."""

    def __init__(self, backbone: nn.Module, dim: int, prompt_gate: bool = True, tau: float = 0.1) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise UserError(f"a general preference model's embedding dimension must be even and >= 2, got {dim}")
        hidden = backbone.config.hidden_size
        self.backbone, self.dim, self.tau = backbone, dim, tau
        self.value_head = nn.Linear(hidden, dim, bias=False)
        self.prompt_head = nn.Linear(hidden, dim // 2, bias=False) if prompt_gate else None

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(N, 2k) unit embeddings and (N, k) block weights of right-padded rows (``input_ids``, ``attention_mask``,
        ``completion_mask``, as :func:`diffalign.lm.tokenize.collate` builds them)."""
        hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        rows = torch.arange(len(hidden), device=hidden.device)
        last = batch["attention_mask"].sum(dim=1) - 1
        embeddings = F.normalize(self.value_head(hidden[rows, last]).float(), dim=-1)
        if self.prompt_head is None:
            return embeddings, embeddings.new_ones(len(hidden), self.dim // 2)
        prompt_end = (batch["completion_mask"].argmax(dim=1) - 1).clamp(min=0)  # the prompt's last token
        return embeddings, torch.softmax(self.prompt_head(hidden[rows, prompt_end]).float(), dim=-1)

    def save(self, folder: str | Path, tokenizer: Any) -> Path:
        folder = Path(folder)
        self.backbone.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        heads = {"value_head.weight": self.value_head.weight.detach().contiguous()}
        if self.prompt_head is not None:
            heads["prompt_head.weight"] = self.prompt_head.weight.detach().contiguous()
        save_file(heads, folder / HEAD_WEIGHTS)
        (folder / HEAD_CONFIG).write_text(json.dumps({"dim": self.dim, "tau": self.tau}) + "\n")
        return folder


def load_general_preference_model(path: str | Path) -> tuple[GeneralPreferenceModel, Any]:
    """The model and tokenizer a folder holds (module docstring); a clear error when it holds no preference head."""
    from transformers import AutoModel

    from diffalign.lm.loading import load_tokenizer

    folder = find_locally(path) or Path(path)  # a local folder, or a Hub name in the local cache
    if not (folder / HEAD_WEIGHTS).is_file() or not (folder / HEAD_CONFIG).is_file():
        raise UserError(f"{PREFIX}{path}: no general preference model there (it needs a transformers model folder with "
                        f"{HEAD_WEIGHTS} and {HEAD_CONFIG}; scripts/train_gpm.py writes one)")
    settings = json.loads((folder / HEAD_CONFIG).read_text())
    heads = load_file(str(folder / HEAD_WEIGHTS))
    model = GeneralPreferenceModel(AutoModel.from_pretrained(str(folder)), int(settings["dim"]),
                                   prompt_gate="prompt_head.weight" in heads, tau=float(settings.get("tau", 0.1)))
    model.load_state_dict({**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}, **heads})
    return model.eval(), load_tokenizer(folder)


def embed_groups(model: GeneralPreferenceModel, tokenizer, prompts: Sequence[Any],
                 groups: Sequence[Sequence[Any]], max_length: int | None = None) -> tuple[Tensor, Tensor]:
    """(G, K, 2k) embeddings of each prompt's K completions and (G, k) the prompt's block weights."""
    tokenized = [tokenize_group(tokenizer, prompt, list(group)) for prompt, group in zip(prompts, groups, strict=True)]
    batch = collate(tokenized, pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    device = next(model.parameters()).device
    embeddings, weights = model({k: v.to(device) for k, v in batch.items()})
    g, k = len(tokenized), len(tokenized[0].completions)
    return embeddings.view(k, g, -1).transpose(0, 1), weights.view(k, g, -1)[0]  # rows are rank-major


class GeneralPreferenceReward:
    """``gpm:PATH``: each round's (G, K, K) tables s(y_i beats y_j | x) for the objectives that read tables."""

    description = ("A general preference model's skew-symmetric scores s(y_i beats y_j) between a group's completions "
                   "(preference embeddings, arXiv 2410.02197); only objectives that read tables take it (lm_gpo).")

    def __init__(self, path: str | Path, batch_size: int = 16) -> None:
        self.model, self.tokenizer = load_general_preference_model(path)
        self.name, self.batch_size = "gpm", batch_size

    @torch.no_grad()
    def tables(self, groups: Sequence[Sequence[str]], prompts: Sequence[str]) -> Tensor:
        """(G, K, K) scores of each prompt's completions against each other."""
        out = []
        for start in range(0, len(groups), self.batch_size):
            v, weights = embed_groups(self.model, self.tokenizer, prompts[start:start + self.batch_size],
                                      groups[start:start + self.batch_size])
            out.append(preference_score(v[:, :, None], v[:, None, :], weights[:, None, None]))
        return torch.cat(out).cpu()


def general_preference_loss(model: GeneralPreferenceModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """-log sigma(s(chosen, rejected) / tau) over a pair batch (the B chosen rows, then the B rejected), and the
    share of pairs ranked right (s > 0)."""
    embeddings, weights = model(batch)
    chosen, rejected = embeddings.chunk(2)
    s = preference_score(chosen, rejected, weights.chunk(2)[0])
    return -F.logsigmoid(s / model.tau).mean(), (s > 0).float().mean()


def train_general_preference(data: str | Path, base: str | Path, out: str | Path, *, dim: int = 4,
                             prompt_gate: bool = True, tau: float = 0.1, steps: int = 300, batch_size: int = 32,
                             learning_rate: float = 1e-3, max_length: int | None = None, seed: int = 0) -> dict[str, float]:
    """Train a GPM on the pairs table ``data`` (prompt, chosen, rejected: :class:`~diffalign.data.text.TextPairDataset`;
    bad rows skipped and counted) from the sequence model at ``base`` (its body; a causal LM folder works) and save it
    to ``out``. Returns the pairs used, the rows skipped, and the last tenth of the steps' mean loss and accuracy."""
    from transformers import AutoModel

    from diffalign.data.pairs import BadRow
    from diffalign.data.text import TextPairDataset
    from diffalign.lm.loading import load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(base)
    table = TextPairDataset(data, tokenizer=tokenizer, max_length=max_length)
    read = []
    for position in range(len(table)):
        try:
            read.append(table.read(position).group)
        except BadRow:
            continue
    if not read:
        raise UserError(f"{data}: no usable pair (every row lacks a prompt, chosen or rejected text)")
    model = GeneralPreferenceModel(AutoModel.from_pretrained(str(base)), dim, prompt_gate, tau).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    losses, accuracies = [], []
    for _ in range(steps):
        draw = torch.randint(0, len(read), (batch_size,), generator=generator)
        batch = collate([read[int(i)] for i in draw], pad_token_id=tokenizer.pad_token_id, max_length=max_length)
        loss, accuracy = general_preference_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        accuracies.append(float(accuracy))
    model.eval().save(out, tokenizer)
    tail = max(1, steps // 10)
    return {"pairs": len(read), "skipped_rows": len(table) - len(read), "loss": sum(losses[-tail:]) / tail,
            "accuracy": sum(accuracies[-tail:]) / tail}
