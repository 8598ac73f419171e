"""Parity of the shared DPO-family losses with TRL's own implementation (to 1e-6)."""

from types import SimpleNamespace

import pytest
import torch
from trl_cases import BATCH_COUPLED, CASES
from trl_reference import trl_dpo_loss

from diffalign import losses


def _scores(n=8, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) * scale for _ in range(4)]


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("trl_type,trl_kwargs,name,options", CASES)
def test_per_example_parity_with_trl(trl_type, trl_kwargs, name, options, beta):
    pc, pr, rc, rr = _scores()
    ours = losses.get(name)(pc, pr, rc, rr, beta=beta, **options)
    assert ours.shape == (8,)
    for i in range(8):  # one-example batches: TRL's mean is then the per-example loss
        one = [t[i : i + 1] for t in (pc, pr, rc, rr)]
        theirs = trl_dpo_loss(trl_type, *one, beta=beta, **trl_kwargs)
        torch.testing.assert_close(ours[i], theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("trl_type,name", BATCH_COUPLED)
def test_batch_coupled_parity_with_trl(trl_type, name):
    """AOT sorts across the batch, so compare batch means."""
    pc, pr, rc, rr = _scores(n=16, seed=3)
    ours = losses.get(name)(pc, pr, rc, rr, beta=0.2).mean()
    theirs = trl_dpo_loss(trl_type, pc, pr, rc, rr, beta=0.2)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def _cpo_stub(loss_type, beta, gamma=0.5, label_smoothing=0.0):
    return SimpleNamespace(
        alpha=0.0,
        loss_type=loss_type,
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=label_smoothing,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_and_cpo_match_trl_cpo_trainer(label_smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr = -torch.rand(8) * 3, -torch.rand(8) * 3
    theirs, _, _ = CPOTrainer.cpo_loss(_cpo_stub("simpo", 2.0, 0.7, label_smoothing), pc, pr)
    ours = losses.get("simpo")(pc, pr, None, None, beta=2.0, gamma=0.7, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)

    theirs, _, _ = CPOTrainer.cpo_loss(_cpo_stub("sigmoid", 0.1, label_smoothing=label_smoothing), pc, pr)
    ours = losses.get("cpo")(pc, pr, None, None, beta=0.1, nll_weight=0.0, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_orpo_matches_trl_odds_ratio_loss():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    pc, pr = -torch.rand(8) * 2 - 1e-3, -torch.rand(8) * 2 - 1e-3
    stub = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    theirs = ORPOTrainer.odds_ratio_loss(stub, pc, pr)[0]
    # TRL returns the term it subtracts from the NLL: loss = nll - beta * log sigma(log odds)
    ours = losses.get("orpo")(pc, pr, None, None, beta=0.25, nll_weight=0.0)
    torch.testing.assert_close(ours, -theirs, atol=1e-6, rtol=1e-6)
