"""The round driver's options: several reward models as one weighted reward (each logged), and MixGRPO's
stochastic window of sampler steps (deterministic steps elsewhere, only the window trained, sliding by round)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import toy_policy_and_reference
from safetensors.torch import load_file

from diffalign.diffusion.logprob import StepRule, gaussian_log_prob, sample_trajectories
from diffalign.errors import UserError
from diffalign.rewards.weighted import combine_rewards, weighted_raw_mean
from diffalign.train import load_config, train
from diffalign.train.online import sde_window

ROOT = Path(__file__).resolve().parent.parent
_SMALL = ["online.groups_per_round=4", "online.group_size=4", "online.steps_per_round=2", "objective.sample_steps=4",
          "train.batch_size=4", "train.max_steps=4", "train.checkpoint_every=0", "train.log_every=1",
          "validation.every=0", "validation.prompt_file=null"]


def _grpo(out: Path, *extra: str):
    return load_config(ROOT / "configs/toy_grpo.yaml", [f"output_dir={out}", *_SMALL, *extra])


# --- several rewards -------------------------------------------------------------------------------------
def test_several_rewards_sum_their_per_prompt_z_scores_with_their_weights():
    prompts = ["a", "a", "a", "b", "b", "b"]
    pick = torch.tensor([20.0, 21.0, 23.0, 19.0, 19.0, 25.0])
    jpeg = torch.tensor([0.3, 0.1, 0.2, -1.0, 1.0, 0.0])

    def z(values: list[float]) -> list[float]:  # population z-scores, 0 when all equal
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        return [(v - mean) / std if std > 0 else 0.0 for v in values]

    expected = [2.0 * p + 0.5 * j for p, j in zip(z(pick[:3].tolist()) + z(pick[3:].tolist()),
                                                   z(jpeg[:3].tolist()) + z(jpeg[3:].tolist()))]
    combined = combine_rewards({"pickscore": pick, "jpeg": jpeg}, [2.0, 0.5], prompts)
    torch.testing.assert_close(combined, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    # one model alone: its raw scores, so a single-reward run is unchanged
    torch.testing.assert_close(combine_rewards({"pickscore": pick}, [1.0], prompts), pick)
    assert weighted_raw_mean({"pickscore": pick, "jpeg": jpeg}, [2.0, 0.5]).item() == pytest.approx(
        2.0 * pick.mean().item() + 0.5 * jpeg.mean().item())


def test_a_round_with_two_rewards_keeps_each_model_s_scores_and_logs_them(tmp_path):
    config = _grpo(tmp_path / "run", "online.reward=[toy_preference, toy_adherence]", "online.reward_weights=[1.0, 3.0]")
    train(config)
    record = json.loads((tmp_path / "run/rounds/round-00000/groups.json").read_text())
    parts = {name: torch.tensor(scores) for name, scores in record["reward_parts"].items()}
    assert set(parts) == {"toy_preference", "toy_adherence"} and record["reward_weights"] == [1.0, 3.0]
    prompts = [p for p in record["prompts"] for _ in range(4)]
    flat = {name: scores.reshape(-1) for name, scores in parts.items()}
    torch.testing.assert_close(torch.tensor(record["rewards"]).reshape(-1),
                               combine_rewards(flat, [1.0, 3.0], prompts), rtol=1e-6, atol=1e-6)
    logs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first = logs[0]  # step 1 trains on round 0
    assert first["train_reward/toy_preference"] == pytest.approx(parts["toy_preference"].mean().item(), rel=1e-5)
    assert first["train_reward/toy_adherence"] == pytest.approx(parts["toy_adherence"].mean().item(), rel=1e-5)
    assert first["train_reward"] == pytest.approx(parts["toy_preference"].mean().item()
                                                  + 3.0 * parts["toy_adherence"].mean().item(), rel=1e-5)


def test_win_rates_replace_the_scores_each_sample_by_the_share_of_its_group_it_beats(tmp_path):
    """Pref-GRPO's reward: each sample's wins (ties half) against the other K - 1 of its group; the round trains on
    them and keeps the raw scores for its logs."""
    from diffalign.rewards.win_rate import group_win_rates

    scores = torch.tensor([[0.3, 0.1, 0.3, 0.9], [2.0, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(group_win_rates(scores), torch.tensor([[0.5, 0.0, 0.5, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    train(_grpo(tmp_path / "run", "online.reward_as=win_rate", "train.max_steps=2"))
    record = json.loads((tmp_path / "run/rounds/round-00000/groups.json").read_text())
    raw = torch.tensor(record["reward_parts"]["toy_preference"]).view(4, 4)
    torch.testing.assert_close(torch.tensor(record["rewards"]), group_win_rates(raw).float())
    with pytest.raises(UserError, match="choose score or win_rate"):
        _grpo(tmp_path, "online.reward_as=rank")


def test_reward_lists_are_checked_with_the_config(tmp_path):
    with pytest.raises(UserError, match="2 finite numbers"):
        _grpo(tmp_path, "online.reward=[toy_preference, toy_adherence]", "online.reward_weights=[1.0]")
    with pytest.raises(UserError, match="twice"):
        _grpo(tmp_path, "online.reward=[toy_preference, toy_preference]")
    with pytest.raises(UserError, match="empty list"):
        _grpo(tmp_path, "online.reward=[]")
    with pytest.raises(UserError, match="gold"):
        _grpo(tmp_path, "online.reward=[toy_preference, toy_adherence]", "validation.gold=toy_adherence",
              "validation.every=2", "validation.prompt_file=toy_heldout", "validation.rewards=[toy_adherence]")


# --- the SDE window ---------------------------------------------------------------------------------------
def test_the_window_slides_by_its_stride_every_few_rounds_and_stops_at_the_clean_end(tmp_path):
    fixed = _grpo(tmp_path, "online.sde_window=2", "online.sde_window_start=1")
    assert sde_window(fixed, 0).tolist() == sde_window(fixed, 9).tolist() == [False, True, True, False]
    sliding = _grpo(tmp_path, "objective.sample_steps=6", "online.sde_window=2", "online.sde_window_shift_every=2",
                    "online.sde_window_stride=1")
    starts = [sde_window(sliding, r).int().argmax().item() for r in range(12)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    assert all(sde_window(sliding, r).sum() == 2 for r in range(12))
    assert sde_window(_grpo(tmp_path), 3).all()  # no window: every step draws noise
    with pytest.raises(UserError, match="must fit"):
        _grpo(tmp_path, "online.sde_window=3", "online.sde_window_start=2")


def test_outside_the_window_the_sampler_takes_the_deterministic_step():
    backbone, _ = toy_policy_and_reference()
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    step_noise = torch.randn(2, 4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    window = torch.tensor([False, True, True, False])
    traj = sample_trajectories(backbone, noise, cond, steps=4, eta=1.0, step_noise=step_noise, stochastic=window)

    rule = StepRule(backbone, 4, 1.0, (4, 16, 16))
    x = noise
    for k, t in enumerate(rule.timesteps):
        with torch.no_grad():
            output = backbone.predict(x, t.expand(2), cond)
        if window[k]:
            mean, std = rule.distribution(k, x, output)
            x = mean + std * step_noise[:, k]
            assert traj.log_probs[:, k].tolist() == pytest.approx(gaussian_log_prob(x, mean, std).tolist(), rel=1e-5)
        else:  # DDIM at eta 0: no noise, no density to train on
            x = rule.scheduler.step(output, int(t), x, eta=0.0).prev_sample
            assert traj.log_probs[:, k].tolist() == [0.0, 0.0]
        torch.testing.assert_close(traj.latents[:, k + 1], x, rtol=1e-5, atol=1e-5)


def test_only_the_window_s_steps_are_trained_and_the_round_records_its_window(tmp_path):
    from diffalign.train.trainer import PreferenceTrainer

    trainer = PreferenceTrainer(_grpo(tmp_path / "run", "online.sde_window=2", "online.sde_window_start=1",
                                      "objective.t_range=[0.0, 1.0]", "train.batch_size=32"))
    steps = trainer._micro_batch(0, 0)["randomness"]["step"]
    assert set(steps.tolist()) == {1, 2}
    recorded = load_file(str(tmp_path / "run/rounds/round-00000/trajectories.safetensors"))
    assert recorded["stochastic"].tolist() == [False, True, True, False]
    assert (recorded["log_probs"][:, [0, 3]] == 0).all() and (recorded["log_probs"][:, [1, 2]] != 0).all()
