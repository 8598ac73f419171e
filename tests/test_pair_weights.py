"""Per-pair weights and margins from the data (``data.weight_column``, ``data.margin_column``), on diffusion
and LM alike: the loss is the mean of weight x loss, and a pair's margin is ``dpo_margin``'s (ODPO's offset,
Amini et al. 2024, Eq. 5), checked by hand; bad values are bad rows; zero weights train nothing."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from fixtures import pickapic_parquet, toy_policy_and_reference
from lm_helpers import preference_batch, tiny_gpt2
from safetensors.torch import load_file

from diffalign.data import PairDataset
from diffalign.diffusion import group_scores, noised_group, schedule_for
from diffalign.errors import UserError
from diffalign.lm import preference_loss
from diffalign.losses import madpo_weight
from diffalign.objectives import OBJECTIVES
from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.train import load_config, train


def _with_columns(path, **columns):
    table = pq.read_table(path)
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values, type=pa.float64()))
    pq.write_table(table, path)
    return path


def test_the_columns_reach_each_pair_and_bad_values_are_bad_rows(tmp_path):
    path = _with_columns(pickapic_parquet(tmp_path / "p.parquet", 5), w=[1.0, 0.5, float("nan"), -1.0, 2.0],
                         m=[0.0, 1.0, 2.0, 3.0, None])
    data = PairDataset(path, resolution=16, weight_column="w", margin_column="m")
    assert len(data) == 2 and data.skipped == {"w": 2, "m": 1}
    assert [(data.example(i).weight, data.example(i).margin) for i in range(2)] == [(1.0, 0.0), (0.5, 1.0)]
    plain = PairDataset(path, resolution=16)
    assert (plain.example(0).weight, plain.example(0).margin) == (1.0, None)


def test_the_diffusion_loss_is_the_mean_of_weight_times_the_margin_loss_computed_by_hand():
    backbone, reference = toy_policy_and_reference()
    config = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [f"model.path={TOY_BASE}", "data.path=unused",
                                                                "objective.loss=dpo_margin"])
    objective = OBJECTIVES["diffusion_dpo"](config.objective, backbone)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 2, 4, 4, 4, generator=g)
    cond = backbone.encode_prompts(["a red circle", "a blue square", "a green triangle"])
    randomness = {"timesteps": torch.tensor([100, 500, 900]), "noise": torch.randn(3, 4, 4, 4, generator=g)}
    weight, margin = torch.tensor([1.0, 0.0, 2.5]), torch.tensor([0.5, 1.0, -0.25])
    loss, _ = objective(backbone, latents, cond, randomness, backbone.denoiser, reference, weight=weight, margin=margin)
    group = noised_group(latents, cond, schedule_for(backbone.scheduler), timesteps=randomness["timesteps"],
                         noise=randomness["noise"])
    with torch.no_grad():
        s, r = group_scores(backbone, group, reference=reference)
    beta = config.objective.beta  # ODPO Eq. 5: -log sigma(beta (r_w - r_l) - margin), each pair times its weight
    by_hand = weight * -F.logsigmoid(beta * ((s[:, 0] - r[:, 0]) - (s[:, 1] - r[:, 1])) - margin)
    torch.testing.assert_close(loss.detach(), by_hand.mean(), rtol=1e-4, atol=1e-6)


def test_the_lm_loss_takes_the_same_weights_and_margins():
    policy, reference = tiny_gpt2(0), tiny_gpt2(1)
    batch = preference_batch(3)
    margin = torch.tensor([0.0, 1.0, 2.0])
    each, _ = zip(*(preference_loss(policy, reference, {k: v[[i, 3 + i]] for k, v in batch.items()}, loss="dpo_margin",
                                    margin=margin[i:i + 1]) for i in range(3)))
    weighted, _ = preference_loss(policy, reference, batch, loss="dpo_margin", margin=margin,
                                  weights=torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(weighted, (2 * each[0] + each[2]) / 3)


def test_a_margin_column_needs_a_loss_with_a_margin_and_both_need_pairs():
    base = [f"model.path={TOY_BASE}", "data.path=x"]
    with pytest.raises(UserError, match="does not take; use a loss with a margin: dpo_margin"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", [*base, "data.margin_column=m"])
    with pytest.raises(UserError, match="self_npo reads images, not pairs"):
        load_config(CONFIGS / "toy_self_npo.yaml", [*base, "data.weight_column=w"])
    assert load_config(CONFIGS / "toy_diffusion_dpo.yaml", [*base, "data.margin_column=m",
                                                             "objective.loss=dpo_margin"]).data.margin_column == "m"


def test_pairs_of_weight_zero_train_nothing_and_the_weights_go_into_the_run(tmp_path):
    def run(name: str, weights: list[float]) -> dict:
        data = _with_columns(pickapic_parquet(tmp_path / f"{name}.parquet", 4), w=weights)
        config = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [
            f"model.path={TOY_BASE}", f"data.path={data}", f"output_dir={tmp_path / name}", "data.weight_column=w",
            "train.max_steps=2", "train.batch_size=2", "validation.every=0", "train.log_every=1"])
        summary = train(config)
        assert math.isfinite(summary["last"]["loss"])
        return load_file(tmp_path / name / "final" / "pytorch_lora_weights.safetensors")

    zero = run("zero", [0.0] * 4)
    assert all(v.abs().max() == 0 for k, v in zero.items() if ".lora.up." in k or "lora_B" in k)
    trained = run("one", [1.0] * 4)
    assert any(v.abs().max() > 0 for k, v in trained.items() if ".lora.up." in k or "lora_B" in k)


def test_the_curriculum_reads_each_epoch_easy_to_hard_as_a_pure_function_of_the_position():
    from diffalign.data import CurriculumOrder

    ease = [0.1, 0.4, 0.4, 0.0, 0.3]
    order = CurriculumOrder(ease, seed=3)
    first, second = [order[k] for k in range(5)], [order[k] for k in range(5, 10)]
    assert [ease[i] for i in first] == sorted(ease, reverse=True) == [ease[i] for i in second]
    assert first[:2] in ([1, 2], [2, 1])  # the tie between 1 and 2 follows the epoch's permutation
    fresh = CurriculumOrder(ease, seed=3)
    assert [fresh[k] for k in reversed(range(10))] == list(reversed(first + second))  # any access order, any process


def test_curriculum_score_gap_orders_the_runs_pairs_by_their_smoothed_preference(tmp_path):
    from diffalign.data.open import open_dataset
    from diffalign.train.trainer import _run_order

    data = pickapic_parquet(tmp_path / "p.parquet", 6)  # pick_0/1: the reddish image wins by 0.01 x row
    config = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [f"model.path={TOY_BASE}", f"data.path={data}",
                                                                "data.score_columns=[[pick_0, pick_1]]",
                                                                "data.curriculum=score_gap"])
    dataset = open_dataset(config.data, "pairs")
    order = _run_order(config, dataset)
    # widest gap first; row 0's gap is 0, a tie, which data.ties=drop leaves out
    assert [dataset.indices[order[k]] for k in range(len(dataset))] == [5, 4, 3, 2, 1]
    with pytest.raises(UserError, match="needs image pairs and data.score_columns"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", [f"model.path={TOY_BASE}", "data.path=x",
                                                          "data.curriculum=score_gap"])


def test_reward_columns_give_each_pair_the_winners_score_minus_the_losers_and_bad_scores_are_bad_rows(tmp_path):
    path = pickapic_parquet(tmp_path / "p.parquet", 5)  # pick favours the reddish image, the labelled winner
    table = pq.read_table(path).to_pydict()
    table["pick_1"][3] = None
    pq.write_table(pa.table(table), path)
    data = PairDataset(path, resolution=16, reward_columns=("pick_0", "pick_1"))
    assert len(data) == 4 and data.skipped == {"pick_1": 1}
    gaps = [data.example(i).reward_gap for i in range(4)]
    assert gaps == pytest.approx([0.0, 0.01, 0.02, 0.04])  # winner minus loser whichever column it sits in
    assert PairDataset(path, resolution=16).example(0).reward_gap is None


@pytest.mark.parametrize("loss", ["madpo", "da_dpo"])
def test_the_diffusion_loss_reads_each_pairs_reward_gap_as_its_paper_says(loss):
    backbone, reference = toy_policy_and_reference()
    config = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [f"model.path={TOY_BASE}", "data.path=unused",
                                                                f"objective.loss={loss}", "data.reward_columns=[a, b]"])
    objective = OBJECTIVES["diffusion_dpo"](config.objective, backbone)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(3, 2, 4, 4, 4, generator=g)
    cond = backbone.encode_prompts(["a red circle", "a blue square", "a green triangle"])
    randomness = {"timesteps": torch.tensor([100, 500, 900]), "noise": torch.randn(3, 4, 4, 4, generator=g)}
    gap = torch.tensor([0.1, 4.0, -9.0])
    got, _ = objective(backbone, latents, cond, randomness, backbone.denoiser, reference, reward_gap=gap)
    group = noised_group(latents, cond, schedule_for(backbone.scheduler), timesteps=randomness["timesteps"],
                         noise=randomness["noise"])
    with torch.no_grad():
        s, r = group_scores(backbone, group, reference=reference)
    delta, beta = (s[:, 0] - r[:, 0]) - (s[:, 1] - r[:, 1]), config.objective.beta
    if loss == "madpo":  # MADPO Eq. 4: w(h) times the DPO loss; w by the authors' formula, c_max 2, tau log 999
        h, tau = gap.double(), math.log(999.0)
        c = 0.5 + 1.5 / (1 + 2.0 * torch.exp(h.abs() - tau))
        w = torch.where(h > -tau, torch.sigmoid(c * h) / torch.sigmoid(h), torch.ones_like(h)).float()
        by_hand = w * -F.logsigmoid(beta * delta)
    else:  # DA-DPO: beta scaled by (|gap| + 1)
        by_hand = -F.logsigmoid(beta * (gap.abs() + 1) * delta)
    torch.testing.assert_close(got.detach(), by_hand.mean(), rtol=1e-4, atol=1e-6)


def test_an_lm_run_weighs_its_first_step_by_madpos_w_of_each_pairs_gap(tmp_path):
    from lm_helpers import lm_config, logged, text_pairs

    gaps = [0.0, 0.5, 3.0, 12.0]
    path = text_pairs(tmp_path / "pairs.parquet", n=4, rm_chosen=[g + 1.0 for g in gaps], rm_rejected=[1.0] * 4)
    train(lm_config(tmp_path, path, "objective.loss=madpo", "data.reward_columns=[rm_chosen, rm_rejected]",
                    "train.max_steps=1"))
    weights = madpo_weight(torch.tensor(gaps, dtype=torch.float64)).tolist()
    assert logged(tmp_path / "run")[0] == pytest.approx(sum(weights) / 4 * math.log(2), rel=1e-5)  # policy = reference


def test_reward_columns_need_pairs_and_a_loss_that_reads_the_gap():
    base = [f"model.path={TOY_BASE}", "data.path=x"]
    with pytest.raises(UserError, match="does not read; use a loss that weighs pairs by it: da_dpo, madpo"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", [*base, "data.reward_columns=[pick_0, pick_1]"])
    with pytest.raises(UserError, match="reads per-pair reward_gap.*data.reward_columns"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", [*base, "objective.loss=madpo"])
    with pytest.raises(UserError, match=r"\[first, second\]"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", [*base, "objective.loss=madpo", "data.reward_columns=[pick_0]"])
    config = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [*base, "objective.loss=da_dpo",
                                                               "data.reward_columns=[pick_0, pick_1]"])
    assert config.data.reward_columns == ["pick_0", "pick_1"]
