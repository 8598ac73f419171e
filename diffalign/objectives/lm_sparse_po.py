"""SparsePO on a causal language model: token-level DPO whose reward and KL terms learned masks weigh.

Christopoulou et al. 2024 (SparsePO, arXiv 2410.05102) let a small mask model decide how much each completion
token counts in the preference: ``u`` sums the tokens' log-ratios and ``d`` their per-token KL terms
(TDPO's sequential KL), each token times its mask, and the loss is ``-log sigma(beta (u - d))`` (the core loss
``sparse_po``, :mod:`diffalign.losses.token_level`). The masks are read from the reference model's hidden states
(every layer's, :class:`diffalign.lm.token_masks.TokenMaskModel`) and train with the policy through the loss; the
trainer adds the mask model to the trained model, so it is optimised, synchronised across processes and
checkpointed with it, and left out of the final weights. ``objective.options.independent=true`` gives the
reward and the KL terms a mask model each (the authors' "sparse-indp"); by default one mask serves both
("sparse-common"), and then each L1 weight counts half, as the authors halve them (the shared mask enters both
norms). ``mask_dropout`` is the mask model's dropout: 0 by default, which is what the authors' runs train with
(their trainer turns off every dropout of the model, the masks' included, as TRL's ``disable_dropout`` does, so
their configured 0.01 never takes effect).

Each step runs the policy and the reference over the full vocabulary at every completion token (the KL terms
need both distributions), as TDPO does: a (2B, T, V) float32 log-softmax for each, more memory than ``lm_dpo``.
The batch is read padded (``data.packing`` does not apply).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffalign import losses
from diffalign.lm.preference import reference_context
from diffalign.config import ranged
from diffalign.lm.token_masks import TokenMaskModel, mask_model_for
from diffalign.objectives.lm import LanguageModelObjective

Tensor = torch.Tensor

@dataclass
class SparsePOOptions:
    # a second mask model for the KL terms (the authors' independent masks); one shared mask otherwise
    independent: bool = False
    # dropout inside the mask model (0: the authors' runs, whose trainer turns every dropout off)
    mask_dropout: float = ranged(0.0, "[0, 1)")


class LanguageModelSparsePO(LanguageModelObjective):
    """SparsePO's masked token-level DPO; see the module docstring."""

    paper = "Christopoulou et al. 2024, arXiv 2410.05102"

    dataset = "text_pairs"
    loss_kinds = ("token-level",)
    reads_packed = False
    Options = SparsePOOptions

    def __init__(self, config, tokenizer: Any = None) -> None:
        super().__init__(config, tokenizer)
        options = self.options_of(config)
        self.independent, self.mask_dropout = options.independent, options.mask_dropout
        if not self.independent:  # one mask in both L1 norms: each weight halved, as the authors' trainer does
            self.options = {k: v / 2 if k in ("l1_reward", "l1_kl") else v for k, v in self.options.items()}
        self.masks: dict[str, TokenMaskModel] = {}

    def trained_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        names = ("sparse_po_reward_masks", "sparse_po_kl_masks") if self.independent else ("sparse_po_masks",)
        self.masks = {name: mask_model_for(model.config, dropout=self.mask_dropout) for name in names}
        return dict(self.masks)

    def token_terms(self, policy, reference, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Per-token log-ratios and KL terms of every row, (N, T-1) for tokens t >= 1, and the reference's hidden
        states of each transformer layer at the positions that predict them."""
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        log_policy = policy(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
        log_policy = log_policy.log_softmax(dim=-1)
        with torch.no_grad(), reference_context(policy, reference) as ref_model:
            out = ref_model(input_ids=ids, attention_mask=attention, use_cache=False, output_hidden_states=True)
            log_ref = out.logits[:, :-1].float().log_softmax(dim=-1)
            states = [h[:, :-1] for h in out.hidden_states[1:]]
        tokens = ids[:, 1:].unsqueeze(-1)
        logratios = (log_policy.gather(-1, tokens) - log_ref.gather(-1, tokens)).squeeze(-1)
        kl = (log_ref.exp() * (log_policy - log_ref)).sum(dim=-1)  # -KL(pi_ref || pi_theta) per token
        return logratios, kl, states

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs = batch["inputs"]
        logratios, kl, states = self.token_terms(policy, reference, inputs)
        masks = [model(states) for model in self.masks.values()]
        reward_mask, kl_mask = masks[0], masks[-1]
        completion = inputs["completion_mask"][:, 1:]
        n = completion.shape[0] // 2
        per_pair = self.spec.fn(
            logratios[:n], logratios[n:], kl[:n], kl[n:], beta=self.beta, chosen_mask=completion[:n],
            rejected_mask=completion[n:], chosen_reward_mask=reward_mask[:n], rejected_reward_mask=reward_mask[n:],
            chosen_kl_mask=kl_mask[:n], rejected_kl_mask=kl_mask[n:], **self.options)
        weight = batch["targets"].get("weight")
        loss = (per_pair if weight is None else per_pair * weight).mean()
        on_tokens = completion.bool()
        with torch.no_grad():  # the unmasked sequence log-ratios: lm_dpo's metrics, then the masks'
            sequence = (logratios * completion).sum(-1)
            metrics = {**losses.preference_metrics(sequence[:n], sequence[n:], None, None, beta=self.beta),
                       "mask/reward_mean": reward_mask[on_tokens].mean(),
                       "mask/reward_zero_share": (reward_mask[on_tokens] == 0).float().mean()}
            if self.independent:
                metrics["mask/kl_mean"] = kl_mask[on_tokens].mean()
        return loss, metrics
