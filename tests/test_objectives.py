"""Objectives on fixed tensors against hand computation, and their data and trainer wiring."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fixtures import Started, ranked_parquet, toy_policy_and_reference

from diffalign import losses
from diffalign.data import RankedListDataset
from diffalign.diffusion import backbone_for, group_scores, load_pipeline, noised_group
from diffalign.errors import UserError
from diffalign.objectives import RankDPO
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_sd15():
    return backbone_for(load_pipeline(ROOT / "assets/models/tiny-sd15", random_init=True))


def _hand_lambda_dpo(policy: list[float], reference: list[float], relevance: list[float], beta: float) -> float:
    """RankDPO Eq. 5-7 in plain floats: sum over i better than j of |dDCG_ij| * -log sigma(beta (r_i - r_j))."""
    r = [p - q for p, q in zip(policy, reference)]
    k = len(r)
    predicted = sorted(range(k), key=lambda i: -r[i])
    rank = {item: position + 1 for position, item in enumerate(predicted)}
    total = 0.0
    for i in range(k):
        for j in range(k):
            if relevance[i] > relevance[j]:
                gain = abs((2 ** relevance[i] - 1) - (2 ** relevance[j] - 1))
                discount = abs(1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j]))
                total += gain * discount * math.log1p(math.exp(-beta * (r[i] - r[j])))
    return total


def test_rank_dpo_equals_eq_5_to_7_by_hand_on_a_real_backbone(tiny_sd15):
    objective = RankDPO(ObjectiveConfig(name="rank_dpo", loss="lambda_dpo", beta=300.0), tiny_sd15)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 4, 8, 8, generator=g)  # B = 2 lists of K = 4
    cond = tiny_sd15.encode_prompts(["a cat", "a dog"])
    randomness = {k: torch.cat([v, v2]) for (k, v), v2 in zip(objective.draw(1, (4, 8, 8), g).items(),
                                                                objective.draw(1, (4, 8, 8), g).values())}
    reference = load_pipeline(ROOT / "assets/models/tiny-sd15", random_init=True, seed=1).unet
    relevance = torch.tensor([[3.0, 2.0, 1.0, 0.0], [2.0, 2.0, 0.5, 0.0]])  # a tie in the second list
    loss, metrics = objective(tiny_sd15, latents, cond, randomness, tiny_sd15.denoiser, reference, scores=relevance)
    group = noised_group(latents, cond, objective.schedule, timesteps=randomness["timesteps"],
                         noise=randomness["noise"])
    s, ref = group_scores(tiny_sd15, group, reference=reference)
    expected = sum(_hand_lambda_dpo(s[b].tolist(), ref[b].tolist(), relevance[b].tolist(), 300.0) for b in range(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(metrics) >= {"implicit_acc", "raw_model_loss", "ref_loss"}


def _loss_and_scores(backbone, name: str, beta: float, captions: list[str], *, objective: str = "diffusion_dpo",
                     items: int = 2, preference: torch.Tensor | None = None, **options):
    """An offline objective with loss ``name`` on random latents (``items`` per caption), its metrics, and
    the scores it compared (policy and reference at the shared timestep and noise), computed again
    outside the objective."""
    from diffalign.objectives import OBJECTIVES

    config = ObjectiveConfig(name=objective, loss=name, beta=beta, loss_options=options)
    method = OBJECTIVES[objective](config, backbone)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(len(captions), items, 4, 8, 8, generator=g)
    cond = backbone.encode_prompts(captions)
    draws = [method.draw(1, (4, 8, 8), g) for _ in captions]
    randomness = {k: torch.cat([d[k] for d in draws]) for k in draws[0]}
    reference = load_pipeline(ROOT / "assets/models/tiny-sd15", random_init=True, seed=1).unet
    loss, metrics = method(backbone, latents, cond, randomness, backbone.denoiser, reference, preference=preference)
    group = noised_group(latents, cond, method.schedule, timesteps=randomness["timesteps"], noise=randomness["noise"])
    return (loss, metrics, *group_scores(backbone, group, reference=reference))


def test_kto_on_pairs_reads_the_winner_as_desirable_and_the_loser_as_undesirable_by_hand(tiny_sd15):
    """KTO Eq. 8 on Diffusion-DPO's pairs: z_0 = max(0, mean r over all 2B images), each image's value
    against it, the batch loss the mean over the 2B images (as TRL's KTO on unpaired preference data)."""
    beta = 500.0
    loss, _, s, ref = _loss_and_scores(tiny_sd15, "kto", beta, ["a cat", "a dog", "a red cube"])
    r = (s - ref).tolist()
    z0 = max(0.0, sum(x for pair in r for x in pair) / 6)
    values = [1 - 1 / (1 + math.exp(-beta * (w - z0))) for w, _ in r] + \
             [1 - 1 / (1 + math.exp(-beta * (z0 - l))) for _, l in r]
    assert loss.item() == pytest.approx(sum(values) / 6, rel=1e-5)
    assert 0.01 < loss.item() < 0.99  # neither saturated: the comparison means something


@pytest.mark.parametrize("name, options", [("npo", {}), ("npo", {"retain_weight": 0.5}), ("bco", {"delta": 0.1})])
def test_every_unpaired_loss_on_pairs_is_its_mean_over_the_images_it_scores(tiny_sd15, name, options):
    loss, _, s, ref = _loss_and_scores(tiny_sd15, name, 500.0, ["a cat", "a dog"], **options)
    expected = losses.get(name)(s[:, 0], s[:, 1], ref[:, 0], ref[:, 1], beta=500.0, **options).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _per_group_loss(objective, policy, reference, preference=None):
    """The objective's per-group loss with the options (batch statistics included) it computes for the batch."""
    return objective.per_group_loss(policy, reference, preference=preference, scores=None,
                                    options=objective.loss_options(policy, reference))


def test_bco_on_diffusion_keeps_the_running_mean_of_the_rewards_as_its_shift(tiny_sd15):
    """BCO (Jung et al. 2024, Eq. 6) with delta = the running mean of beta * r over the steps so far,
    this one included (as TRL's BCOTrainer); ``loss_options.delta`` fixes it and keeps no state."""
    from diffalign.objectives import OBJECTIVES

    beta = 500.0
    objective = OBJECTIVES["diffusion_dpo"](ObjectiveConfig(name="diffusion_dpo", loss="bco", beta=beta), tiny_sd15)
    assert objective.attach(tiny_sd15.denoiser) == [objective.reward_shift]
    policy, reference = torch.tensor([[0.002, -0.001], [0.003, 0.0]]), torch.zeros(2, 2)
    later = torch.tensor([[0.004, 0.001], [0.005, 0.002]])
    _per_group_loss(objective, policy, reference)
    got = _per_group_loss(objective, later, reference)
    delta = beta * (policy.mean() + later.mean()).item() / 2
    hand = [(-math.log(1 / (1 + math.exp(-(beta * w - delta)))) - math.log(1 / (1 + math.exp(beta * l - delta)))) / 2
            for w, l in later.tolist()]
    assert got.tolist() == pytest.approx(hand, rel=1e-5)
    fixed = OBJECTIVES["diffusion_dpo"](ObjectiveConfig(name="diffusion_dpo", loss="bco", beta=beta,
                                                        loss_options={"delta": 0.0}), tiny_sd15)
    assert fixed.attach(tiny_sd15.denoiser) == []
    expected = losses.get("bco")(later[:, 0], later[:, 1], reference[:, 0], reference[:, 1], beta=beta, delta=0.0)
    torch.testing.assert_close(_per_group_loss(fixed, later, reference),
                               expected.view(2, 2).mean(0))


def test_diffusion_kto_scores_each_labelled_image_by_hand(tiny_sd15):
    """Diffusion-KTO: KTO Eq. 8 per image, liked images against z_0 from above, the others from below,
    z_0 = max(0, mean r of the batch); the loss is the mean over the images in batch order."""
    beta, liked = 500.0, [1.0, 0.0, 0.0, 1.0, 0.0]
    loss, metrics, s, ref = _loss_and_scores(tiny_sd15, "kto", beta, ["a cat", "a dog", "a red cube", "sky", "sea"],
                                             objective="diffusion_kto", items=1, preference=torch.tensor(liked))
    r = (s - ref)[:, 0].tolist()
    z0 = max(0.0, sum(r) / len(r))
    values = [1 - 1 / (1 + math.exp(-beta * ((x - z0) if y else (z0 - x)))) for x, y in zip(r, liked)]
    assert loss.item() == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert 0.01 < loss.item() < 0.99
    agree = [(x > z0) if y else (x < z0) for x, y in zip(r, liked)]
    assert metrics["implicit_acc"].item() == pytest.approx(sum(agree) / len(agree))
    assert metrics["rewards/desirable"].item() == pytest.approx(beta * (r[0] + r[3]) / 2, rel=1e-5)


def test_diffusion_kto_with_npo_trains_on_the_undesirable_images_only(tiny_sd15):
    liked = torch.tensor([1.0, 0.0, 0.0])
    loss, _, s, ref = _loss_and_scores(tiny_sd15, "npo", 500.0, ["a cat", "a dog", "a red cube"],
                                       objective="diffusion_kto", items=1, preference=liked)
    npo = losses.get("npo")(None, s[1:, 0], None, ref[1:, 0], beta=500.0)
    assert loss.item() == pytest.approx(npo.sum().item() / 3, rel=1e-5)  # the liked image adds 0


def test_labelled_images_drop_rows_without_a_binary_label_and_carry_the_label(tmp_path):
    from fixtures import images_parquet

    from diffalign.data import CaptionedImageDataset

    path = images_parquet(tmp_path / "liked.parquet", 6, labels=[1.0, 0.0, 1.0, None, 2.0, float("nan")])
    data = CaptionedImageDataset(path, resolution=32, label_column="label")
    assert len(data) == 3 and data.skipped == {"label": 3}
    assert [data.example(i).preference for i in range(3)] == [1.0, 0.0, 1.0]
    assert [data.example(i).index for i in range(3)] == [0, 1, 2]
    flags = CaptionedImageDataset(images_parquet(tmp_path / "flags.parquet", 3, labels=[False, True, False]),
                                  resolution=32, label_column="label")
    assert [flags.example(i).preference for i in range(3)] == [0.0, 1.0, 0.0]
    with pytest.raises(UserError, match="label must be 1/true"):
        CaptionedImageDataset(path, resolution=32, label_column="label", on_error="raise")


def test_diffusion_kto_trains_from_the_cli_on_tiny_sdxl(tmp_path):
    import json

    from fixtures import images_parquet

    from diffalign.cli import main

    data = images_parquet(tmp_path / "liked.parquet", 6, labels=[1, 0, 1, 0, 0, 1])
    assert main(["train", str(ROOT / "configs/tiny_sdxl_dpo.yaml"), f"data.path={data}", "data.label_column=label",
                 "objective.name=diffusion_kto", "objective.loss=kto", "objective.beta=1000",
                 f"output_dir={tmp_path / 'run'}", "train.max_steps=2"]) == 0
    logs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/desirable", "rewards/undesirable", "implicit_acc", "kl"} <= set(logs[-1])
    with pytest.raises(UserError, match="diffusion_kto takes unpaired losses: apo_zero_unpaired, bco, kto, npo"):
        load_config(ROOT / "configs/tiny_sdxl_dpo.yaml", ["objective.name=diffusion_kto"])


def test_diffusion_kto_takes_its_reference_point_over_all_processes(tiny_sd15):
    """The batch mean in z_0 goes through ``mean_over_processes`` (here a stand-in for a second process
    whose batch mean is 0.01), in the loss and in the logged accuracy alike."""
    from diffalign.objectives.diffusion_kto import DiffusionKTO

    other_mean = 0.01
    objective = DiffusionKTO(ObjectiveConfig(name="diffusion_kto", loss="kto", beta=50.0), tiny_sd15)
    objective.mean_over_processes = lambda value: (value + other_mean) / 2
    policy, reference = torch.tensor([[0.02], [-0.01], [0.03]]), torch.zeros(3, 1)
    liked = torch.tensor([1.0, 0.0, 1.0])
    z0 = (0.04 / 3 + other_mean) / 2
    expected = losses.get("kto")(policy[[0, 2], 0], policy[[1], 0], reference[[0, 2], 0], reference[[1], 0],
                                 beta=50.0, kl=z0)
    got = _per_group_loss(objective, policy, reference, liked)
    torch.testing.assert_close(got, expected[[0, 2, 1]], rtol=1e-6, atol=0)
    accuracy = lambda: objective.reward_metrics(policy, reference, preference=liked,  # noqa: E731
                                                options=objective.loss_options(policy, reference))["implicit_acc"]
    assert accuracy().item() == 1.0
    objective.mean_over_processes = lambda value: (value + 0.03) / 2  # z_0 = 0.0217: above the liked 0.02
    assert accuracy().item() == pytest.approx(2 / 3)
    policy = torch.zeros(3, 1)  # an untrained LoRA: every reward is 0 = z_0, all ties
    objective.mean_over_processes = lambda value: value
    assert accuracy().item() == 0.5


def test_positive_ratio_draws_liked_images_at_that_rate_and_only_for_labelled_images(tmp_path):
    from fixtures import images_parquet

    from diffalign.data import CaptionedImageDataset
    from diffalign.train.trainer import _run_order

    data = images_parquet(tmp_path / "liked.parquet", 6, labels=[1, 0, 0, 0, None, 0])
    kto = ["objective.name=diffusion_kto", "objective.loss=kto", f"data.path={data}", "data.label_column=label"]
    config = load_config(ROOT / "configs/tiny_sdxl_dpo.yaml", [*kto, "data.positive_ratio=0.8"])
    dataset = CaptionedImageDataset(data, resolution=32, label_column="label")
    order = _run_order(config, dataset)
    liked = [dataset.example(order[k]).preference for k in range(2000)]
    assert sum(liked) / len(liked) == pytest.approx(0.8, abs=0.03)  # the data's own share is 1 in 5
    assert {order[k] for k in range(2000)} == set(range(5))
    with pytest.raises(UserError, match="positive_ratio must be in"):
        load_config(ROOT / "configs/tiny_sdxl_dpo.yaml", [*kto, "data.positive_ratio=1"])
    with pytest.raises(UserError, match="diffusion_dpo reads pairs"):
        load_config(ROOT / "configs/tiny_sdxl_dpo.yaml", ["data.positive_ratio=0.5"])
    only_liked = images_parquet(tmp_path / "only.parquet", 3, labels=[1, 1, 1])
    with pytest.raises(UserError, match="has 3 liked and 0 other"):
        _run_order(load_config(ROOT / "configs/tiny_sdxl_dpo.yaml", [*kto, f"data.path={only_liked}",
                                                                     "data.positive_ratio=0.8"]),
                   CaptionedImageDataset(only_liked, resolution=32, label_column="label"))


@pytest.mark.slow
def test_diffusion_kto_on_two_processes_computes_what_one_process_at_double_batch_does(tmp_path):
    """KTO's reference point is a batch statistic: on two processes it is the mean over both (the
    global batch, as the authors' code reduces it), so two processes at 2 images each train exactly
    as one process at 4. The liked/other ratio is drawn by position, so both read the same images."""
    import json
    import os
    import sys

    from fixtures import images_parquet

    data = images_parquet(tmp_path / "liked.parquet", 8, labels=[1, 0, 1, 0, 0, 1, 0, 0])
    common = [str(ROOT / "configs/tiny_sdxl_dpo.yaml"), f"data.path={data}", "data.label_column=label",
              "data.positive_ratio=0.75", "objective.name=diffusion_kto", "objective.loss=kto", "objective.beta=5000",
              "model.path=" + str(ROOT / "assets/models/tiny-sdxl"), "train.max_steps=4", "train.checkpoint_every=0"]
    two = Started([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diffalign",
                          "train", *common, f"output_dir={tmp_path / 'two'}", "train.batch_size=2"],
                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    train(load_config(common[0], [*common[1:], f"output_dir={tmp_path / 'one'}", "train.batch_size=4"]))  # beside
    two = two.result()
    assert two.returncode == 0, two.stderr[-3000:]
    one_logs, two_logs = ([json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                          for run in ("one", "two"))
    # DDP rounding at beta 5000 leaves 3e-4; a z_0 of each process's own batch is 2e-2 off
    assert [x["loss"] for x in two_logs] == pytest.approx([x["loss"] for x in one_logs], rel=2e-3)
    assert [x["implicit_acc"] for x in two_logs] == pytest.approx([x["implicit_acc"] for x in one_logs])


def test_ranked_lists_come_best_first_and_bad_rows_are_counted(tmp_path):
    data = ranked_parquet(tmp_path / "lists.parquet", n=4, k=3, bad_rows=(2,))
    dataset = RankedListDataset(data, resolution=16)
    assert len(dataset) == 3 and dataset.skipped == {"scores": 1}
    example = dataset.example(1)
    assert example.pixels.shape == (3, 3, 16, 16) and example.scores.tolist() == [2.0, 1.0, 0.0]
    red = example.pixels[:, 0].mean(dim=(1, 2))  # the best image is the reddest
    assert red[0] > red[1] > red[2]
    with pytest.raises(UserError, match="row 2, column 'scores'"):
        RankedListDataset(data, resolution=16, on_error="raise")


def test_rank_dpo_trains_from_the_cli_config_on_tiny_sdxl(tmp_path):
    data = ranked_parquet(tmp_path / "lists.parquet", n=4, k=3)
    config = load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [
        f"data.path={data}", f"output_dir={tmp_path / 'run'}", "objective.name=rank_dpo",
        "objective.loss=lambda_dpo", "train.max_steps=2"])
    summary = train(config)
    assert summary["steps"] == 2 and (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert math.isfinite(summary["last"]["loss"])


def test_a_pairwise_loss_for_rank_dpo_is_a_config_error():
    with pytest.raises(UserError, match="rank_dpo takes listwise losses: .*lambda_dpo"):
        load_config(None, ["model.path=x", "data.path=y", "objective.name=rank_dpo", "objective.loss=dpo"])


def test_inpo_scores_each_image_at_its_ddim_inverted_latent_by_hand():
    import torch.nn.functional as F

    from diffalign.objectives import InPO

    backbone, reference = toy_policy_and_reference()
    objective = InPO(ObjectiveConfig(name="inpo", beta=2500.0, options={"inversion_steps": 10, "inversion_eta": 0.0}), backbone)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2, 4, 16, 16, generator=g)
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    randomness = {"timesteps": torch.tensor([450, 120]), "inversion_seed": torch.tensor([7])}
    loss, _ = objective(backbone, latents, cond, randomness, backbone.denoiser, reference)

    # by hand, per pair: DDIM-invert each image over the grid 0, 100, ... below t, then to t;
    # the noise that x_t implies is the target
    a = backbone.scheduler.alphas_cumprod
    expected = []
    for pair, t, path in [(0, 450, [None, 0, 100, 200, 300, 400, 450]), (1, 120, [None, 0, 100, 120])]:
        embeds = cond[pair:pair + 1].repeat_items(2).embeds
        with torch.no_grad():
            x = latents[pair].clone()
            for prev, nxt in zip(path[:-1], path[1:]):
                a_prev = torch.tensor(1.0) if prev is None else a[prev]
                eps = backbone.denoiser(x, torch.full((2,), prev or 0), encoder_hidden_states=embeds).sample
                x = a[nxt].sqrt() * (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt() + (1 - a[nxt]).sqrt() * eps
            implied = (x - a[t].sqrt() * latents[pair]) / (1 - a[t]).sqrt()
            step = torch.full((2,), t)
            mse = lambda net: (net(x, step, encoder_hidden_states=embeds).sample - implied).pow(2).mean(dim=(1, 2, 3))  # noqa: E731
            policy, ref = mse(backbone.denoiser), mse(reference)
            expected.append(-F.logsigmoid(-2500.0 * ((policy[0] - ref[0]) - (policy[1] - ref[1]))))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["objective.name=inpo"], [
    "objective.name=smpo", "objective.loss=smpo", "objective.beta=25000",
    "data.score_columns=[[pick_0, pick_1], [aes_0, aes_1]]"], ["objective.loss=kto"]])
def test_pair_objective_trains_from_the_cli_on_tiny_sdxl(tmp_path, overrides):
    from fixtures import pickapic_parquet

    from diffalign.cli import main

    data = pickapic_parquet(tmp_path / "pairs.parquet", n=4)
    assert main(["train", str(ROOT / "configs/tiny_sdxl_dpo.yaml"), f"data.path={data}",
                 f"output_dir={tmp_path / 'run'}", "train.max_steps=2", *overrides]) == 0
    metrics = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file() and metrics


def test_smpo_scores_each_image_at_its_renoise_inverted_latent_with_the_smoothed_margin_by_hand():
    import torch.nn.functional as F

    from diffalign.objectives import SmPO

    backbone, reference = toy_policy_and_reference()
    objective = SmPO(ObjectiveConfig(name="smpo", loss="smpo", beta=25000.0), backbone)
    latents = torch.randn(1, 2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = backbone.encode_prompts(["a red circle"])
    randomness = {"timesteps": torch.tensor([250]), "inversion_seed": torch.tensor([3])}
    preference = torch.tensor([0.6])
    loss, _ = objective(backbone, latents, cond, randomness, backbone.denoiser, reference, preference=preference)

    # by hand: each move of the 10-point grid below 250 (then to 250) averages the DDIM epsilon at the
    # start with one ReNoise re-evaluation at the point it leads to (the authors' code); no eta
    a = backbone.scheduler.alphas_cumprod
    embeds = cond.repeat_items(2).embeds
    eps_at = lambda x, t: backbone.denoiser(x, torch.full((2,), t), encoder_hidden_states=embeds).sample  # noqa: E731
    with torch.no_grad():
        x = latents[0].clone()
        path = [None, 0, 100, 200, 250]
        for prev, nxt in zip(path[:-1], path[1:]):
            a_prev = torch.tensor(1.0) if prev is None else a[prev]
            move = lambda eps: a[nxt].sqrt() * (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt() + (1 - a[nxt]).sqrt() * eps  # noqa: E731,B023
            first = eps_at(x, prev or 0)
            x = move((first + eps_at(move(first), nxt)) / 2)
        implied = (x - a[250].sqrt() * latents[0]) / (1 - a[250]).sqrt()
        mse = lambda net: (net(x, torch.full((2,), 250), encoder_hidden_states=embeds).sample - implied).pow(2).mean(dim=(1, 2, 3))  # noqa: E731
        policy, ref = mse(backbone.denoiser), mse(reference)
        delta = -(policy[0] - ref[0]) + (policy[1] - ref[1])
        expected = -F.logsigmoid((2 * 0.6 - 1) * 25000.0 * delta)  # Eq. 9 with gamma = 1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_smpo_takes_only_soft_label_losses():
    with pytest.raises(UserError, match="smpo takes soft-label losses: .*smpo"):
        load_config(None, ["model.path=x", "data.path=y", "objective.name=smpo", "objective.loss=dpo"])


_ON_ANY_DEVICE = [  # (objective, core loss, items per group, loss options, targets)
    ("diffusion_dpo", "dpo", 2, {}, {}),
    ("diffusion_dpo", "bco", 2, {"delta": 0.5}, {}),  # a fixed shift
    ("diffusion_dpo", "bco", 2, {}, {}),  # the running shift, kept on the device
    ("diffusion_kto", "kto", 1, {}, {"preference": torch.tensor([1.0, 0.0])}),
    ("rank_dpo", "lambda_dpo", 3, {}, {"scores": torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 0.0]])}),
    ("self_npo", "huber", 1, {}, {}),
    ("ddo", "ddo", 2, {}, {}),  # each real image and the sample for its caption
]


@pytest.mark.slow
@pytest.mark.parametrize("name, loss, items, options, targets", _ON_ANY_DEVICE, ids=lambda v: str(v)[:20])
def test_objectives_keep_the_loss_and_every_metric_on_the_models_device(name, loss, items, options, targets):
    """On a GPU, a tensor an objective makes on the CPU and mixes with the model's breaks the step,
    and a metric left on the CPU breaks the NCCL all-reduce of the first log step on many GPUs (DDO's
    round counter and a fixed BCO shift once did). With the model, latents and randomness on the meta
    device, any CPU tensor mixed in raises here, and the loss and metrics must come back on meta.
    InPO and SmPO read their timesteps to the host (meta tensors have none); their device handling
    is the same code as the rows here, past that read."""
    from torch.fx.experimental import _config as fx_config

    from diffalign.objectives import OBJECTIVES

    meta = torch.device("meta")
    backbone, reference = toy_policy_and_reference()
    prompts = ["a red circle", "a blue square"]
    cond = backbone.encode_prompts(prompts).to(meta)
    objective = OBJECTIVES[name](ObjectiveConfig(name=name, loss=loss, beta=100.0, loss_options=options,
                                                 sample_steps=2, sample_guidance_scale=1.0), backbone)
    backbone.pipe.to(meta)
    objective.attach(backbone.denoiser)
    g = torch.Generator().manual_seed(0)
    draws = [objective.draw(1, (4, 16, 16), g) for _ in prompts]
    randomness = {k: torch.cat([d[k] for d in draws]) for k in draws[0]}
    randomness = {k: v if k == "sample_seed" else v.to(meta) for k, v in randomness.items()}  # seeds are read
    latents = torch.randn(2, items, 4, 16, 16, device=meta)
    uses_reference = objective.dataset != "images"
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):  # boolean masks on meta tensors
        loss_value, metrics = objective(backbone, latents, cond, randomness, backbone.denoiser,
                                        reference.to(meta) if uses_reference else None,
                                        **{k: v.to(meta) for k, v in targets.items()})
    assert loss_value.device == meta
    assert metrics and {k: v.device for k, v in metrics.items() if v.device != meta} == {}
