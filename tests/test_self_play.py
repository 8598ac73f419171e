"""The self-play loops (SPPO, GPO, INPO, DNO, RSO, DRIFT): the core losses and the group estimators by hand,
gradients pointing the right way, each objective's pair rule on a made-up round, the objectives' losses on
the toy model against hand computation, the config's checks, and training with exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures import toy_policy_and_reference
from safetensors.torch import load_file

from diffalign import losses
from diffalign.diffusion import group_scores, noised_group
from diffalign.diffusion.likelihood import denoising_scores
from diffalign.errors import UserError
from diffalign.losses.self_play import preference_scores, win_rates
from diffalign.objectives import DNO, GPO, RSO, SPPO, INPONash
from diffalign.objectives.rso import rejection_sample
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig
from diffalign.train.online import Round

ROOT = Path(__file__).resolve().parent.parent
sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731

PC, PR, RC, RR = (torch.tensor(v) for v in ([-1.0, 0.2], [-2.0, 0.1], [-1.5, 0.0], [-1.0, 0.3]))


# --- the core losses -----------------------------------------------------------------------------------
def test_sppo_regresses_each_log_ratio_on_its_win_rate_by_hand():
    beta, pw, pl = 0.5, torch.tensor([0.9, 0.6]), torch.tensor([0.2, 0.45])
    got = losses.get("sppo")(PC, PR, RC, RR, beta=beta, win_chosen=pw, win_rejected=pl)
    for i in range(2):
        rw, rl = float(PC[i] - RC[i]), float(PR[i] - RR[i])
        expected = ((rw - (float(pw[i]) - 0.5) / beta) ** 2 + (rl - (float(pl[i]) - 0.5) / beta) ** 2) / 2
        assert got[i].item() == pytest.approx(expected, rel=1e-6)
    # certain wins and losses give half of TRL's sppo_hard (the authors' trainer halves the sum)
    hard = losses.get("sppo_hard")(PC, PR, RC, RR, beta=beta)
    torch.testing.assert_close(losses.get("sppo")(PC, PR, RC, RR, beta=beta, win_chosen=torch.ones(2),
                                                  win_rejected=torch.zeros(2)), hard / 2)


def test_gpo_regresses_each_log_ratio_on_its_preference_score_by_hand():
    beta, sw, sl = 2.0, torch.tensor([1.2, 0.1]), torch.tensor([-0.7, -0.1])
    got = losses.get("gpo")(PC, PR, RC, RR, beta=beta, score_chosen=sw, score_rejected=sl)
    for i in range(2):
        rw, rl = float(PC[i] - RC[i]), float(PR[i] - RR[i])
        expected = ((rw - float(sw[i]) / beta) ** 2 + (rl - float(sl[i]) / beta) ** 2) / 2
        assert got[i].item() == pytest.approx(expected, rel=1e-6)


def test_inpo_nash_is_ipo_against_the_geometric_mix_of_the_base_and_the_previous_iterate_by_hand():
    beta, ratio = 0.25, 0.3
    qc, qr = torch.tensor([-1.2, 0.4]), torch.tensor([-1.1, 0.0])  # the previous iterate's scores
    got = losses.get("inpo_nash")(PC, PR, RC, RR, beta=beta, previous_chosen=qc, previous_rejected=qr, ratio=ratio)
    for i in range(2):
        h = float(PC[i] - PR[i]) - ratio * float(RC[i] - RR[i]) - (1 - ratio) * float(qc[i] - qr[i])
        assert got[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-6)
    # ratio 1: IPO against the base; ratio 0: IPO against the previous iterate
    ipo = losses.get("ipo")
    torch.testing.assert_close(losses.get("inpo_nash")(PC, PR, RC, RR, beta=beta, previous_chosen=qc,
                                                       previous_rejected=qr, ratio=1.0), ipo(PC, PR, RC, RR, beta=beta))
    torch.testing.assert_close(losses.get("inpo_nash")(PC, PR, RC, RR, beta=beta, previous_chosen=qc,
                                                       previous_rejected=qr, ratio=0.0), ipo(PC, PR, qc, qr, beta=beta))
    with pytest.raises(ValueError, match="ratio"):
        losses.get("inpo_nash")(PC, PR, RC, RR, beta=beta, previous_chosen=qc, previous_rejected=qr, ratio=1.5)


@pytest.mark.parametrize("name, inputs", [
    ("sppo", {"win_chosen": torch.full((3,), 0.8), "win_rejected": torch.full((3,), 0.2)}),
    ("gpo", {"score_chosen": torch.full((3,), 0.8), "score_rejected": torch.full((3,), -0.8)}),
    ("inpo_nash", {"previous_chosen": torch.zeros(3), "previous_rejected": torch.zeros(3)}),
])
def test_at_the_reference_the_gradient_raises_the_winner_and_lowers_the_loser(name, inputs):
    pc, pr = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    losses.get(name)(pc, pr, torch.zeros(3), torch.zeros(3), beta=1.0, **inputs).sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_the_self_play_losses_name_the_inputs_an_objective_must_estimate():
    assert losses.spec("sppo").inputs == ("win_chosen", "win_rejected")
    assert losses.spec("gpo").inputs == ("score_chosen", "score_rejected")
    assert losses.spec("inpo_nash").inputs == ("previous_chosen", "previous_rejected")
    assert losses.spec("inpo_nash").options == {"ratio": pytest.approx(1 / 3)}
    assert losses.spec("dpo").inputs == ()


def test_win_rates_and_preference_scores_against_the_group_by_hand():
    rewards = torch.tensor([[0.0, 1.0, -2.0]])
    got = win_rates(rewards)
    for i in range(3):
        expected = sum(sig(float(rewards[0, i] - rewards[0, j])) for j in range(3)) / 3  # j = i counts 1/2
        assert got[0, i].item() == pytest.approx(expected, rel=1e-6)
    assert got.mean().item() == pytest.approx(0.5)  # the group's win-rates against itself average 1/2
    torch.testing.assert_close(preference_scores(rewards), torch.tensor([[1 / 3, 4 / 3, -5 / 3]]))
    table = torch.tensor([[[0.0, 2.0, -1.0], [-2.0, 0.0, 3.0], [1.0, -3.0, 0.0]]])  # a cyclic, skew-symmetric table
    torch.testing.assert_close(preference_scores(table), torch.tensor([[1 / 3, 1 / 3, -2 / 3]]))


# --- the pair rules ------------------------------------------------------------------------------------
def _round(rewards: list[list[float]]) -> Round:
    g, k = len(rewards), len(rewards[0])
    latents = torch.arange(g * k, dtype=torch.float32).view(g, k, 1, 1, 1, 1).expand(g, k, 1, 4, 2, 2).clone()
    return Round(prompts=[f"p{i}" for i in range(g)], latents=latents, log_probs=torch.zeros(g, k, 1),
                 rewards=torch.tensor(rewards), winners=lambda: None,
                 generator=lambda i: torch.Generator().manual_seed(i))


def _objective(cls, **config):
    objective = object.__new__(cls)  # the pair rules read the config's settings and the loss spec only
    objective.spec = losses.spec(config.pop("loss", "dpo"))
    for key, value in config.items():
        setattr(objective, key, value)
    return objective


def test_sppo_pairs_each_prompt_s_best_and_worst_with_their_win_rates():
    rewards = [[0.0, 1.0, -2.0], [3.0, 3.5, 2.0]]
    units = _objective(SPPO, loss="sppo").training_units(_round(rewards))
    assert units["latents"][:, :, 0, 0, 0].tolist() == [[1.0, 2.0], [4.0, 5.0]]  # (group * K + item)
    expected = win_rates(torch.tensor(rewards))
    torch.testing.assert_close(units["targets"]["win_chosen"], expected[[0, 1], [1, 1]])
    torch.testing.assert_close(units["targets"]["win_rejected"], expected[[0, 1], [2, 2]])
    assert units["prompt_of"].tolist() == [0, 1] and units["logged"]["pairs_per_round"].item() == 2


def test_gpo_pairs_carry_the_preference_scores():
    units = _objective(GPO, loss="gpo").training_units(_round([[0.0, 1.0, -2.0]]))
    torch.testing.assert_close(units["targets"]["score_chosen"], torch.tensor([4 / 3]))
    torch.testing.assert_close(units["targets"]["score_rejected"], torch.tensor([-5 / 3]))


def test_dno_keeps_only_pairs_with_a_wide_enough_reward_gap_and_never_none():
    rewards = [[0.0, 1.0, -2.0], [3.0, 3.2, 3.1], [0.0, 0.4, 0.5]]
    units = _objective(DNO, min_gap=1.0).training_units(_round(rewards))
    assert units["prompt_of"].tolist() == [0] and units["latents"][:, :, 0, 0, 0].tolist() == [[1.0, 2.0]]
    units = _objective(DNO, min_gap=10.0).training_units(_round(rewards))  # none clears it: the widest alone
    assert units["prompt_of"].tolist() == [0] and units["logged"]["pairs_per_round"].item() == 1


def test_rejection_sampling_follows_algorithm_1():
    rewards = torch.tensor([0.0, 3.0, 1.0, 2.0])
    # beta -> 0: only the best left in the pool is ever accepted, so the order is by reward
    assert rejection_sample(rewards, beta=1e-6, accepted=3, generator=torch.Generator().manual_seed(0)) == [1, 3, 2]
    # beta -> infinity: every candidate is accepted as it is met
    assert rejection_sample(rewards, beta=1e9, accepted=3, generator=torch.Generator().manual_seed(0)) == [0, 1, 2]
    # in between, by the acceptance probabilities exp((r - r_max) / beta), met in index order: candidate 0 comes
    # first with probability exp(-3), else the best (probability 1) is accepted (seeded: 400 draws, 4 sd wide)
    firsts = [rejection_sample(rewards, beta=1.0, accepted=1, generator=torch.Generator().manual_seed(s))[0]
              for s in range(400)]
    p0 = math.exp(-3)
    assert abs(firsts.count(0) - 400 * p0) < 4 * math.sqrt(400 * p0 * (1 - p0))
    assert firsts.count(1) == 400 - firsts.count(0)


def test_rso_pairs_accepted_samples_in_acceptance_order_the_better_first_and_repeats_itself():
    rewards = [[0.0, 3.0, 1.0, 2.0], [5.0, 5.0, 5.0, 1.0]]
    rso = _objective(RSO, rso_beta=1e-6, accepted=4)
    units = rso.training_units(_round(rewards))
    # group 0 accepts 1, 3, 2, 0: pairs (1, 3) and (2, 0); group 1 accepts 0, 1, 2, 3: (0, 1) is a tie and dropped
    assert units["prompt_of"].tolist() == [0, 0, 1]
    assert units["latents"][:, :, 0, 0, 0].tolist() == [[1.0, 3.0], [2.0, 0.0], [6.0, 7.0]]
    again = _objective(RSO, rso_beta=1.0, accepted=2).training_units(_round(rewards))
    torch.testing.assert_close(again["latents"], _objective(RSO, rso_beta=1.0, accepted=2).training_units(
        _round(rewards))["latents"])


def test_the_rules_need_a_reward_for_every_sample():
    round_ = _round([[0.0, 1.0]])
    round_.rewards = None
    with pytest.raises(ValueError, match="online.reward"):
        _objective(SPPO, loss="sppo").training_units(round_)


# --- the objectives on the toy model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    return toy_policy_and_reference()


def _scored(backbone, objective, reference):
    g = torch.Generator().manual_seed(0)
    pairs = torch.randn(2, 2, 4, 16, 16, generator=g)
    randomness = objective.draw(2, (4, 16, 16), g)
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    return pairs, randomness, cond, noised_group(pairs, cond, objective.schedule, timesteps=randomness["timesteps"],
                                                 noise=randomness["noise"])


def test_sppo_objective_is_the_sppo_loss_against_the_previous_round_by_hand(toy):
    backbone, reference_unet = toy
    objective = SPPO(ObjectiveConfig(name="sppo", loss="sppo", beta=500.0), backbone)
    objective.steps_per_round = 1
    objective.attach(backbone.denoiser)
    with torch.no_grad():  # the policy moves away from pi_t, the snapshot taken at attach
        for p in backbone.denoiser.parameters():
            p.add_(1e-3)
    pairs, randomness, cond, group = _scored(backbone, objective, None)
    win = {"win_chosen": torch.tensor([0.8, 0.6]), "win_rejected": torch.tensor([0.3, 0.1])}
    loss, metrics = objective(backbone, pairs, cond, randomness, backbone.denoiser, reference_unet, **win)
    s, previous = group_scores(backbone, group, reference=objective.previous_round())
    s = s.detach()
    expected = sum(((float(s[b, 0] - previous[b, 0]) - (float(win["win_chosen"][b]) - 0.5) / 500) ** 2
                    + (float(s[b, 1] - previous[b, 1]) - (float(win["win_rejected"][b]) - 0.5) / 500) ** 2) / 2
                   for b in range(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert metrics["round"].item() == 0
    with torch.no_grad():
        for p in backbone.denoiser.parameters():
            p.sub_(1e-3)


def test_inpo_objective_mixes_the_base_and_the_previous_round_by_hand(toy):
    backbone, reference_unet = toy
    objective = INPONash(ObjectiveConfig(name="inpo_nash", loss="inpo_nash", beta=500.0), backbone)
    objective.steps_per_round = 1
    objective.attach(backbone.denoiser)  # pi_t: the nudged toy model; the base: the untouched one
    with torch.no_grad():
        for p in backbone.denoiser.parameters():
            p.add_(1e-3)
    pairs, randomness, cond, group = _scored(backbone, objective, reference_unet)
    loss, _ = objective(backbone, pairs, cond, randomness, backbone.denoiser, reference_unet)
    s, base = group_scores(backbone, group, reference=reference_unet)
    previous = denoising_scores(backbone, group, denoiser=objective.previous_round()).detach()
    s = s.detach()
    assert not torch.allclose(previous, base) and not torch.allclose(previous, s)
    expected = 0.0
    for b in range(2):
        h = (float(s[b, 0] - s[b, 1]) - float(base[b, 0] - base[b, 1]) / 3
             - 2 * float(previous[b, 0] - previous[b, 1]) / 3)
        expected += (h - 1 / 1000) ** 2 / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        for p in backbone.denoiser.parameters():
            p.sub_(1e-3)


# --- configs and training -------------------------------------------------------------------------------
def test_the_config_matches_losses_to_the_objectives_that_estimate_their_inputs():
    with pytest.raises(UserError, match="sppo trains sppo or sppo_hard"):
        load_config(ROOT / "configs/toy_sppo.yaml", ["objective.loss=dpo"])
    with pytest.raises(UserError, match="objective.name=sppo"):
        load_config(ROOT / "configs/toy_diffusion_dpo.yaml", ["objective.loss=sppo"])
    with pytest.raises(UserError, match="objective.options.accepted=9 is more than the group.s 8 candidates"):
        load_config(ROOT / "configs/toy_rso.yaml", ["objective.options.accepted=9"])
    with pytest.raises(UserError, match="needs no reward"):
        load_config(ROOT / "configs/toy_drift.yaml", ["online.reward=toy_preference"])


_TINY = ["online.steps_per_round=2", "online.groups_per_round=2", "online.group_size=3", "objective.sample_steps=2",
         "online.reward=jpeg_incompressibility", "train.checkpoint_every=2", "train.batch_size=2",
         "model.path=assets/models/tiny-sdxl", "model.random_init=true", "data.resolution=32", "validation.every=0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sppo", "inpo_nash"])
def test_trains_and_resumes_exactly_across_a_round(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = ROOT / f"configs/toy_{name}.yaml"
    straight = tmp_path / "straight"
    train(load_config(config, [f"output_dir={straight}", *_TINY, "train.max_steps=4"]))
    summary = json.loads((straight / "metrics.json").read_text())
    assert math.isfinite(summary["last"]["loss"]) and summary["last"]["round"] == 1.0
    split = tmp_path / "split"
    train(load_config(config, [f"output_dir={split}", *_TINY, "train.max_steps=2"]))
    train(load_config(config, [f"output_dir={split}", *_TINY, "train.max_steps=4", "train.resume=latest"]))
    a = load_file(str(straight / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split / "final" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora.up" in k or "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_an_lm_trains_sppo_with_win_rates_estimated_from_its_samples_rewards():
    from lm_helpers import preference_batch, tiny_gpt2

    from diffalign.lm import preference_loss, sequence_logps

    policy, reference, batch = tiny_gpt2(0), tiny_gpt2(1), preference_batch(2)
    rewards = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.5, -0.5, 0.0]])  # K = 4 completions per prompt
    items = torch.tensor([[2, 1], [1, 2]])  # each prompt's best and worst, as the batch holds them
    won = win_rates(rewards).gather(1, items)
    loss, _ = preference_loss(policy, reference, batch, loss="sppo", beta=0.1, win_chosen=won[:, 0],
                              win_rejected=won[:, 1])
    def scores(model):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logps(logits, batch["input_ids"], batch["completion_mask"])[0]

    r = (scores(policy) - scores(reference)).chunk(2)
    expected = (((r[0] - (won[:, 0] - 0.5) / 0.1) ** 2 + (r[1] - (won[:, 1] - 0.5) / 0.1) ** 2) / 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="win_chosen, win_rejected"):
        preference_loss(policy, reference, batch, loss="sppo", beta=0.1)
