"""Pref-GRPO's pairwise reward: a judge's verdicts on every pair of a group become in-group win rates (the authors'
``_pairwise_win_rate`` by hand), in both orders against position bias, and a round trains on them."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.errors import UserError
from diffalign.paths import CONFIGS
from diffalign.rewards.pairwise_judge import PairwiseJudge, pairwise_win_rates
from diffalign.train import load_config, train


class BrightnessJudge(PairwiseJudge):
    """The pairwise judge with its endpoint replaced: it prefers the brighter image, or (``biased``) always the
    first one shown, answering in the tags the judge reads."""

    def __init__(self, biased: bool = False, both_orders: bool = False) -> None:
        super().__init__("http://localhost:9/v1", model="rigged", both_orders=both_orders)
        self.biased = biased

    def ask_about(self, images, question):
        first, second = (sum(image.convert("L").getdata()) for image in images)
        better = 1 if self.biased or first > second else 2
        return f"<think>Image 1: {first}, Image 2: {second}</think>\n<answer>Image {better} is better</answer>"


def _authors_win_rates(k: int, verdicts: dict[tuple[int, int], float]) -> list[float]:
    """Pref-GRPO's _pairwise_win_rate, written out: each image's wins over its comparisons."""
    wins, compared = [0.0] * k, [0] * k
    for (i, j), first_won in verdicts.items():
        compared[i] += 1
        compared[j] += 1
        wins[i] += first_won
        wins[j] += 1 - first_won
    return [w / c for w, c in zip(wins, compared)]


def test_a_group_s_win_rates_are_the_authors_by_hand():
    levels = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.6, 0.4])  # two groups of 3, of brightness ...
    images = levels.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).clone()
    rates = pairwise_win_rates(BrightnessJudge(), images, ["a", "a", "a", "b", "b", "b"], 3)
    expected = []
    for group in levels.view(2, 3):
        verdicts = {(i, j): float(group[i] > group[j]) for i in range(3) for j in range(i + 1, 3)}
        expected += _authors_win_rates(3, verdicts)
    assert rates.tolist() == pytest.approx(expected) == [0.0, 1.0, 0.5, 0.0, 1.0, 0.5]


def test_a_position_biased_judge_gives_the_first_image_every_win_unless_asked_both_orders():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert pairwise_win_rates(BrightnessJudge(biased=True), images, ["a"] * 4, 4).tolist() == \
        pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])  # the order shown decides
    both = pairwise_win_rates(BrightnessJudge(biased=True, both_orders=True), images, ["a"] * 4, 4)
    assert both.tolist() == pytest.approx([0.5] * 4)


def test_answers_without_a_verdict_and_single_images_are_refused():
    judge = BrightnessJudge()
    assert judge.verdict("<think>..</think><answer> Image 2 is better </answer>", "a") == 0.0
    with pytest.raises(UserError, match="answered 'Both are fine.' for the prompt 'a'"):
        judge.verdict("Both are fine.", "a")
    with pytest.raises(UserError, match="not single images"):
        judge(torch.rand(2, 3, 8, 8), ["a", "a"])
    with pytest.raises(UserError, match="online.group_size must be >= 2"):
        pairwise_win_rates(judge, torch.rand(3, 3, 8, 8), ["a"] * 3, 1)
    with pytest.raises(UserError, match="pairwise_judge compares the images of a group"):
        load_config(CONFIGS / "toy_grpo.yaml", ["online.reward=pairwise_judge:http://localhost:9/v1",
                                                "online.group_size=1"])


def test_a_round_trains_on_the_judge_s_win_rates(tmp_path, monkeypatch):
    import diffalign.train.online as online

    monkeypatch.setattr(online, "load_reward", lambda spec: BrightnessJudge())
    config = load_config(CONFIGS / "toy_grpo.yaml", [
        f"output_dir={tmp_path / 'run'}", "online.reward=pairwise_judge:http://localhost:9/v1",
        "online.groups_per_round=2", "online.group_size=3", "objective.sample_steps=2", "online.steps_per_round=1",
        "train.batch_size=2", "train.max_steps=1", "train.checkpoint_every=0", "train.log_every=1",
        "validation.every=0"])
    train(config)
    record = json.loads((tmp_path / "run/rounds/round-00000/groups.json").read_text())
    for rates in torch.tensor(record["rewards"]):  # each group's win rates: 1, 1/2 and 0 in some order
        assert sorted(rates.tolist()) == [0.0, 0.5, 1.0]
    logged = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert logged["train_reward"] == pytest.approx(0.5)  # a pairwise judge has no scale: its mean is always 1/2
