"""SparsePO (Christopoulou et al. 2024): the core loss by hand against the authors' objective, its gradients, the
token mask model, the LM objective's token terms, and training runs (masks learned, checkpointed, resumed exactly,
left out of the final weights)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lm_helpers import lm_config, logged, text_pairs, tiny_gpt2
from safetensors.torch import load_file

from fixtures import Started

from diffalign import losses
from diffalign.errors import UserError
from diffalign.lm import completion_logps
from diffalign.lm.token_masks import TokenMaskModel, mask_model_for
from diffalign.objectives import OBJECTIVES
from diffalign.train import load_config, train

R_W, R_L = [[0.5, -0.2, 0.1]], [[-0.3, 0.4, 0.0]]  # token log-ratios; the last rejected token is padding
K_W, K_L = [[-0.1, -0.05, -0.2]], [[-0.3, -0.01, 0.0]]  # -KL(pi_ref || pi) per token
C_W, C_L = [[1.0, 1.0, 1.0]], [[1.0, 1.0, 0.0]]


def T(x):
    return torch.tensor(x, dtype=torch.float64)


def call(mu_w, mu_l, md_w, md_l, beta=0.5, **options):
    return losses.get("sparse_po")(T(R_W), T(R_L), T(K_W), T(K_L), beta=beta, chosen_mask=T(C_W),
                                   rejected_mask=T(C_L), chosen_reward_mask=T(mu_w), rejected_reward_mask=T(mu_l),
                                   chosen_kl_mask=T(md_w), rejected_kl_mask=T(md_l), **options)


def by_hand(mu_w, mu_l, md_w, md_l, beta=0.5, l1_reward=0.0, l1_kl=0.0):
    """The authors' get_batch_loss_metrics: u, d over the completion tokens, -logsigmoid(beta (u - d)) + L1."""
    total = lambda xs, ms, cs: sum(x * m * c for x, m, c in zip(xs, ms, cs))  # noqa: E731
    u = total(R_W[0], mu_w[0], C_W[0]) - total(R_L[0], mu_l[0], C_L[0])
    d = total(K_W[0], md_w[0], C_W[0]) - total(K_L[0], md_l[0], C_L[0])
    l1 = (l1_reward * (total(mu_w[0], [1] * 3, C_W[0]) + total(mu_l[0], [1] * 3, C_L[0]))
          + l1_kl * (total(md_w[0], [1] * 3, C_W[0]) + total(md_l[0], [1] * 3, C_L[0])))
    return -math.log(1 / (1 + math.exp(-beta * (u - d)))) + l1


def test_sparse_po_is_the_authors_masked_token_objective():
    mu_w, mu_l, md_w, md_l = [[0.2, 1.5, 0.0]], [[0.7, 0.0, 9.0]], [[1.0, 0.3, 0.6]], [[0.0, 2.0, 5.0]]
    torch.testing.assert_close(call(mu_w, mu_l, md_w, md_l, l1_reward=0.01, l1_kl=0.02),
                               T([by_hand(mu_w, mu_l, md_w, md_l, l1_reward=0.01, l1_kl=0.02)]))
    ones, zeros = [[1.0] * 3], [[0.0] * 3]
    # all masks 1: TDPO1, -log sigma(beta (sum r_w - sum r_l - (sum k_w - sum k_l)))
    tdpo = -F.logsigmoid(T(0.5 * ((0.4 - 0.1) - ((-0.35) - (-0.31)))))
    torch.testing.assert_close(call(ones, ones, ones, ones), tdpo.reshape(1))
    # KL masks 0: DPO on the summed token log-ratios
    torch.testing.assert_close(call(ones, ones, zeros, zeros), (-F.logsigmoid(T(0.5 * (0.4 - 0.1)))).reshape(1))


def test_descent_raises_the_chosen_tokens_and_grows_the_masks_where_they_help():
    r_w, r_l = T(R_W).requires_grad_(), T(R_L).requires_grad_()
    mu_w = T([[0.5, 0.5, 0.5]]).requires_grad_()
    loss = losses.get("sparse_po")(r_w, r_l, T(K_W), T(K_L), beta=0.5, chosen_mask=T(C_W), rejected_mask=T(C_L),
                                   chosen_reward_mask=mu_w, rejected_reward_mask=T([[0.5] * 3]),
                                   chosen_kl_mask=T([[0.5] * 3]), rejected_kl_mask=T([[0.5] * 3]))
    loss.sum().backward()
    assert (r_w.grad < 0).all() and (r_l.grad[0, :2] > 0).all() and r_l.grad[0, 2] == 0  # padding gets none
    # a chosen token's mask grows where its log-ratio is positive, shrinks where negative
    assert mu_w.grad[0, 0] < 0 and mu_w.grad[0, 1] > 0


def test_the_mask_model_is_non_negative_starts_small_but_alive_and_reads_every_layer():
    torch.manual_seed(0)
    model = TokenMaskModel(hidden_size=8, layers=3)
    states = [torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    masks = model(states)
    assert masks.shape == (2, 5) and (masks >= 0).all() and masks.mean() < 0.1
    assert (masks > 0).float().mean() > 0.5  # the mixer averages the layers: no token starts with a dead mask
    torch.testing.assert_close(model.mixer.weight, torch.full((1, 3), 1 / 3))
    with pytest.raises(ValueError, match="reads 3 layers' hidden states, got 2"):
        model(states[:2])
    gpt2 = mask_model_for(tiny_gpt2().config)
    assert len(gpt2.per_layer) == 2 and gpt2.norm.normalized_shape == (32,)


def _objective(loss_options: str = "{}", options: str = "{}"):
    config = lm_config_for_objective(loss_options, options)
    return OBJECTIVES["lm_sparse_po"](config.objective)


def lm_config_for_objective(loss_options: str, options: str = "{}"):
    return load_config(None, ["model.path=unused", "objective.name=lm_sparse_po", "objective.loss=sparse_po",
                              f"objective.loss_options={loss_options}", f"objective.options={options}",
                              "data.path=unused"])


def test_the_token_terms_are_the_sequence_log_ratio_split_by_token_and_the_reference_kl():
    from lm_helpers import preference_batch

    policy, reference = tiny_gpt2(0), tiny_gpt2(1)
    batch = preference_batch(3)
    objective = _objective()
    logratios, kl, states = objective.token_terms(policy, reference, batch)
    completion = batch["completion_mask"][:, 1:]
    with torch.no_grad():
        expected = completion_logps(policy, batch)[0] - completion_logps(reference, batch)[0]
    torch.testing.assert_close((logratios * completion).sum(-1), expected, rtol=1e-5, atol=1e-5)
    assert (kl <= 1e-6).all() and len(states) == 2 and states[0].shape == (6, batch["input_ids"].shape[1] - 1, 32)
    same, _, _ = objective.token_terms(reference, reference, batch)
    assert same.abs().max() == 0
    # at the start (policy = reference) every term is 0 and the loss log 2, whatever the masks
    objective.trained_modules(reference)
    loss, metrics = objective(reference, reference, {"inputs": batch, "targets": {}})
    assert loss.item() == pytest.approx(math.log(2)) and "mask/reward_zero_share" in metrics


def test_independent_masks_and_the_l1_weights_of_a_shared_mask():
    shared = _objective("{l1_reward: 0.002, l1_kl: 0.004}")
    assert shared.options == {"l1_reward": 0.001, "l1_kl": 0.002}  # one mask in both norms: halved
    independent = _objective("{l1_reward: 0.002}", "{independent: true}")
    assert set(independent.trained_modules(tiny_gpt2())) == {"sparse_po_reward_masks", "sparse_po_kl_masks"}
    assert independent.options == {"l1_reward": 0.002}


def test_a_sparse_po_run_learns_its_masks_resumes_exactly_and_saves_the_lm_alone(tmp_path):
    data = text_pairs(tmp_path / "pairs.parquet", n=10)
    common = ["objective.name=lm_sparse_po", "objective.loss=sparse_po", "train.checkpoint_every=3"]
    train(lm_config(tmp_path, data, "train.max_steps=6", *common, name="straight"))
    train(lm_config(tmp_path, data, "train.max_steps=3", *common, name="split"))
    train(lm_config(tmp_path, data, "train.max_steps=6", *common, "train.resume=latest", name="split"))
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")
    assert logged(tmp_path / "straight")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert logged(tmp_path / "straight")[-1] < math.log(2)
    saved = load_file(tmp_path / "split" / "checkpoints" / "step-0000003" / "model.safetensors")
    assert any(key.startswith("sparse_po_masks.") for key in saved)  # the masks train and checkpoint with the LM
    final = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    assert final and not any("sparse_po" in key for key in final)
    mixer = saved["sparse_po_masks.mixer.weight"]
    assert not torch.allclose(mixer, torch.full_like(mixer, 1 / mixer.numel()))  # moved from its start


def test_sparse_po_needs_its_token_level_loss_and_refuses_packing():
    base = ["model.path=unused", "data.path=unused", "objective.name=lm_sparse_po"]
    with pytest.raises(UserError, match="token-level"):
        load_config(None, [*base, "objective.loss=dpo"])
    with pytest.raises(UserError, match="reads every token's distribution from the padded rows"):
        load_config(None, [*base, "objective.loss=sparse_po", "data.packing=true"])
    with pytest.raises(UserError, match="has no option 'independant'"):
        load_config(None, [*base, "objective.loss=sparse_po", "objective.loss_options={independant: true}"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_po_stays_finite_for_huge_log_ratios(dtype):
    huge = torch.tensor([[1e4, -1e4, 3e3]], dtype=dtype, requires_grad=True)
    mask = torch.ones(1, 3, dtype=dtype)
    out = losses.get("sparse_po")(huge, -huge, huge, -huge, beta=1.0, chosen_mask=mask, rejected_mask=mask,
                                  chosen_reward_mask=mask, rejected_reward_mask=mask, chosen_kl_mask=mask * 0.5,
                                  rejected_kl_mask=mask * 0.5)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(huge.grad).all() and out.dtype == torch.float32


@pytest.mark.slow
def test_two_processes_train_the_masks_as_one_does_at_double_batch(tmp_path):
    """torchrun (gloo) at 2 pairs per process vs one process at 4: the mask model's gradients are synchronised with
    the LM's, so the losses and the final masks' checkpoint agree."""
    import os
    import sys

    from lm_helpers import empty_yaml

    from diffalign.toy.text_model import TOY_LM

    data = text_pairs(tmp_path / "pairs.parquet", n=8)
    common = [f"model.path={TOY_LM}", "objective.name=lm_sparse_po", "objective.loss=sparse_po", f"data.path={data}",
              "train.max_steps=3", "train.checkpoint_every=3", "train.log_every=1", "train.report_to=none",
              "train.learning_rate=1e-3", "train.adam_epsilon=1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = Started([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diffalign",
                          "train", str(empty_yaml(tmp_path)), *common, f"output_dir={tmp_path / 'two'}",
                          "train.batch_size=2"], env=env)
    train(load_config(None, [*common, f"output_dir={tmp_path / 'one'}", "train.batch_size=4"]))  # beside them
    two = two.result()
    assert two.returncode == 0, two.stderr[-3000:]
    for one, two_ in zip(logged(tmp_path / "one"), logged(tmp_path / "two")):
        assert two_ == pytest.approx(one, rel=1e-5)
    a, b = ({key.removeprefix("module."): value for key, value in load_file(
        tmp_path / run / "checkpoints" / "step-0000003" / "model.safetensors").items()} for run in ("one", "two"))
    masks = [key for key in a if key.startswith("sparse_po_masks.")]
    assert masks and all(torch.allclose(a[key], b[key], atol=2e-5) for key in masks)
