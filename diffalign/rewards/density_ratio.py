"""CDR, a density-ratio reward from two language models (Xu et al. 2024, "CDR: Customizable Density Ratios of
Strong-over-weak LLMs for Preference Annotation", arXiv 2411.02481): r(x, y) = log pi_strong(y | x) - log
pi_weak(y | x), the log-likelihood ratio of a better-aligned model over a less-aligned one, summed over the
completion's tokens. It needs no trained reward model, only two LMs (a DPO-tuned model over its base, a large model
over a small one), and costs two forwards per completion, so it serves as an online reward.

``cdr:STRONG:WEAK[:average=true]``: STRONG and WEAK are causal-LM folders or finished runs (each with its own
tokenizer: each model scores the completion as its tokenizer splits it); ``average`` divides by the completion's
token count under the strong model's tokenizer (the authors' ``avg_drsow_reward``). As the authors' code
(Red-Hat-AI-Innovation-Team/reward_hub, ``drsow.py``), special tokens (the EOS) are left out of the sums. Their
customisation (an instruction and exemplars prepended to the prompt) is the prompt itself here: put it in the prompts.
"""

from __future__ import annotations

from typing import Sequence

import torch

from diffalign.errors import UserError
from diffalign.lm.preference import completion_logps
from diffalign.lm.tokenize import collate, tokenize_group

Tensor = torch.Tensor
PREFIX = "cdr:"


class DensityRatioReward:
    """``cdr:STRONG:WEAK[:average=true]``; see the module docstring."""

    description = ("CDR: log p_strong(completion | prompt) - log p_weak(completion | prompt) of two local causal LMs "
                   "(a better-aligned over a less-aligned one); higher is better.")

    def __init__(self, strong: str, weak: str, *, average: bool = False, batch_size: int = 16) -> None:
        from diffalign.lm.loading import load_trained_lm

        self.models = [load_trained_lm(strong), load_trained_lm(weak)]
        for model, _ in self.models:
            model.eval()
        self.name, self.average, self.batch_size = "cdr", average, batch_size

    @classmethod
    def parse(cls, spec: str) -> "DensityRatioReward":
        parts = spec.removeprefix(PREFIX).split(":")
        options = dict(part.split("=", 1) for part in parts[2:] if "=" in part)
        if len(parts) < 2 or not all(parts[:2]) or set(options) - {"average"} or len(options) != len(parts) - 2 \
                or options.get("average", "false") not in ("true", "false"):
            raise UserError(f"reward {spec!r}: write cdr:STRONG:WEAK[:average=true], STRONG and WEAK two causal-LM "
                            "folders or finished runs")
        return cls(parts[0], parts[1], average=options.get("average") == "true")

    @torch.no_grad()
    def _logps(self, which: int, completions: Sequence[str], prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Each completion's summed log-prob under model ``which`` and its token count, special tokens left out."""
        model, tokenizer = self.models[which]
        special = torch.tensor(tokenizer.all_special_ids)
        sums, counts = [], []
        for start in range(0, len(completions), self.batch_size):
            groups = [tokenize_group(tokenizer, p, [c]) for p, c in zip(prompts[start:start + self.batch_size],
                                                                        completions[start:start + self.batch_size])]
            batch = collate(groups, pad_token_id=tokenizer.pad_token_id, max_length=None)
            batch["completion_mask"] = batch["completion_mask"] * ~torch.isin(batch["input_ids"], special)
            logps, lengths = completion_logps(model, batch)
            sums.append(logps.float())
            counts.append(lengths.float())
        return torch.cat(sums), torch.cat(counts)

    def __call__(self, completions: Sequence[str], prompts: Sequence[str]) -> Tensor:
        strong, tokens = self._logps(0, completions, prompts)
        ratio = strong - self._logps(1, completions, prompts)[0]
        return ratio / tokens.clamp(min=1) if self.average else ratio
