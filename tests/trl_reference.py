"""Run TRL's own loss code on score tensors we choose, for parity tests.

TRL 1.x computes DPO-family losses inline in ``DPOTrainer._compute_loss``. We call that
method unbound with a minimal stand-in for the trainer and a fake model whose per-token
log-probs sum to the scores we want (one completion token per sequence), with the reference
log-probs precomputed. What comes back is TRL's batch-mean loss.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from trl.trainer.dpo_trainer import DPOTrainer


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics

    @staticmethod
    def unwrap_model(m):
        return m


class _FakeLM:
    """Returns the given per-token log-probs (N, T-1) as TRL's fused LM head would."""

    training = True

    def __init__(self, token_logps: torch.Tensor):
        self.token_logps = token_logps

    def __call__(self, input_ids, **kwargs):
        n, length = input_ids.shape
        log_probs = self.token_logps
        return SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros(n, length - 1),
            mean_logits=torch.zeros(n, length - 1),
            is_top1=torch.zeros(n, length - 1, dtype=torch.bool),
        )


def trl_dpo_loss(
    loss_type: str, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, **kwargs
) -> torch.Tensor:
    """TRL's batch-mean DPOTrainer loss for these scores (one completion token per sequence)."""
    token_logps = torch.cat([pc, pr]).float().unsqueeze(1)
    mask = torch.tensor([[0, 1]] * token_logps.shape[0])
    return trl_dpo_loss_from_token_logps(loss_type, token_logps, mask, rc, rr, **kwargs)


def trl_dpo_loss_from_token_logps(
    loss_type: str,
    token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """TRL's loss given the policy's per-token log-probs (2B, T-1) of a [chosen; rejected] batch."""
    n, length = completion_mask.shape
    # TRL's fused head gets labels = -100 outside the completion and returns 0 log-prob there
    fake = _FakeLM(token_logps.float() * completion_mask[:, 1:])
    trainer = SimpleNamespace(
        model=fake,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, length, dtype=torch.long),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc.float(),
        "ref_rejected_logps": rr.float(),
    }
    return DPOTrainer._compute_loss(trainer, fake, inputs, return_outputs=False)


def trl_kto_loss(
    token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_token_logps: torch.Tensor,
    kl_completion_mask: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """TRL's KTOTrainer loss (``loss_type`` kto or apo_zero_unpaired) given the policy's per-token
    log-probs of the rows (B, T-1) and of the mismatched KL rows, with the reference's sequence
    log-probs precomputed."""
    from trl.trainer.kto_trainer import KTOTrainer

    n, length = completion_mask.shape
    kl_ids = torch.zeros_like(kl_completion_mask)
    fake = _FakeLM(token_logps.float() * completion_mask[:, 1:])
    fake_kl = _FakeLM(kl_token_logps.float() * kl_completion_mask[:, 1:])

    def model(input_ids, **kwargs):  # the KL rows come as their own tensor
        return (fake_kl if input_ids is kl_ids else fake)(input_ids, **kwargs)

    model.training = True
    trainer = SimpleNamespace(model=model, accelerator=_Accelerator(), aux_loss_enabled=False, calculate_KL=True,
                              precompute_ref_logps=True, loss_type=loss_type, beta=beta,
                              desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                              _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(trainer, m, batch)
    inputs = {
        "input_ids": torch.zeros(n, length, dtype=torch.long),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "completion_mask": completion_mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_completion_mask),
        "KL_completion_mask": kl_completion_mask,
        "label": labels,
        "ref_logps": ref_logps.float(),
        "ref_KL_logps": ref_kl_logps.float(),
    }
    return KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
