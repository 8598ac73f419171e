"""The reward ensemble's preference strength (Secrets of RLHF II) and the pairs it disputes, dropped."""

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from fixtures import pickapic_parquet

from diffalign.data import PairDataset
from diffalign.data.ensemble import preference_strength, vote_share
from diffalign.errors import UserError
from diffalign.train import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_preference_strength_by_hand():
    """d_m = winner's score - loser's, each model's differences over the pairs divided by their (population)
    standard deviation; u and sigma the mean and standard deviation over the models."""
    first = [[1.0, 10.0], [0.0, 30.0], [2.0, 20.0]]
    second = [[0.0, 20.0], [1.0, 10.0], [2.0, 0.0]]
    first_wins = [True, True, False]
    differences = [[a - b for a, b in zip(f, s)] for f, s in zip(first, second)]
    spreads = []
    for m in range(2):
        column = [row[m] for row in differences]
        mean = sum(column) / 3
        spreads.append(math.sqrt(sum((x - mean) ** 2 for x in column) / 3))
    means, stds = [], []
    for row, wins in zip(differences, first_wins):
        d = [(x / spread) * (1 if wins else -1) for x, spread in zip(row, spreads)]
        means.append(sum(d) / 2)
        stds.append(abs(d[0] - d[1]) / 2)
    got_mean, got_std = preference_strength(torch.tensor(first), torch.tensor(second), torch.tensor(first_wins))
    torch.testing.assert_close(got_mean, torch.tensor(means))
    torch.testing.assert_close(got_std, torch.tensor(stds))


def _flip(path: Path, rows: set[int]) -> Path:
    table = pq.read_table(path)
    labels = [1.0 - v if i in rows else v for i, v in enumerate(table.column("label_0").to_pylist())]
    table = table.set_column(table.schema.get_field_index("label_0"), "label_0", [labels])
    pq.write_table(table, path)
    return path


def test_ensemble_filter_drops_the_pairs_the_models_dispute_and_says_so(tmp_path, capsys):
    """Fixture: pick backs the reddish image by 0.01 i, aes backs it by 0.6 on even rows and the bluish one by
    0.5 on odd rows. With rows 1 and 2 mislabelled, the ensemble disputes row 2 (both models against the
    label) and row 1 only if the scaled aes difference outweighs pick's; the hand sums decide."""
    data = _flip(pickapic_parquet(tmp_path / "pairs.parquet", 6), {1, 2})
    table = pq.read_table(data).to_pydict()
    columns = [("pick_0", "pick_1"), ("aes_0", "aes_1")]
    first = torch.tensor([[table[a][i] for a, _ in columns] for i in range(6)], dtype=torch.float64)
    second = torch.tensor([[table[b][i] for _, b in columns] for i in range(6)], dtype=torch.float64)
    mean, _ = preference_strength(first, second, torch.tensor([v >= 0.5 for v in table["label_0"]]))
    disputed = {i for i in range(6) if mean[i] < 0}
    assert 2 in disputed and 0 not in disputed
    kept = PairDataset(data, resolution=32, ensemble_columns=columns, ensemble="filter")
    assert kept.disputed == len(disputed) and len(kept) == 6 - len(disputed)
    assert [kept.read(p, decode=False).index for p in range(len(kept))] == [i for i in range(6) if i not in disputed]
    assert f"dropped {len(disputed)} of 6 pairs" in capsys.readouterr().err
    assert len(PairDataset(data, resolution=32, ensemble_columns=columns)) == 6  # judged, not filtered


def test_ensemble_weight_counts_each_pair_by_the_share_of_models_backing_its_label(tmp_path):
    """Vote share: models whose gap backs the label count 1, a zero gap 1/2; the pair's weight (its column's
    value, or 1) is multiplied by it."""
    first, second = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]), torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0]])
    torch.testing.assert_close(vote_share(first, second, torch.tensor([True, False])), torch.tensor([0.5, 0.5]))
    data = _flip(pickapic_parquet(tmp_path / "pairs.parquet", 4), {1})
    table = pq.read_table(data).to_pydict()
    votes = []
    for i in range(4):
        winner = 0 if table["label_0"][i] >= 0.5 else 1
        backs = [(table[f"{m}_{winner}"][i] - table[f"{m}_{1 - winner}"][i]) for m in ("pick", "aes")]
        votes.append(sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in backs) / 2)
    weighted = PairDataset(data, resolution=32, ensemble_columns=[("pick_0", "pick_1"), ("aes_0", "aes_1")],
                           ensemble="weight")
    assert [weighted.read(p, decode=False).weight for p in range(4)] == pytest.approx(votes)
    assert votes[1] < 1.0 and votes[2] == 1.0  # row 1 mislabelled; row 0 has a zero pick gap (half a vote)


def test_ensemble_settings_are_checked_with_the_config(tmp_path):
    def config(*more):
        return load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [f"data.path={tmp_path}", *more])

    with pytest.raises(UserError, match="needs a pairs objective and data.ensemble_columns"):
        config("data.ensemble=filter")
    with pytest.raises(UserError, match="one \\[first, second\\] column pair"):
        config("data.ensemble_columns=[pick_0]", "data.ensemble=filter")
    with pytest.raises(UserError, match="data.ensemble"):
        config("data.ensemble=vote", "data.ensemble_columns=[[pick_0, pick_1]]")
    assert config("data.ensemble=weight", "data.ensemble_columns=[[pick_0, pick_1]]").data.ensemble == "weight"
    assert config("data.ensemble=filter", "data.ensemble_columns=[[pick_0, pick_1]]").data.ensemble == "filter"


def test_pairs_every_model_disputes_train_nothing_with_ensemble_weight(tmp_path):
    """data.ensemble=weight reaches the loss: with every model scoring each labelled winner lower, every
    pair's weight is 0 and the LoRA's B matrices stay zero."""
    import pyarrow as pa
    from safetensors.torch import load_file

    from diffalign.paths import CONFIGS, TOY_BASE
    from diffalign.train import train

    data = pickapic_parquet(tmp_path / "pairs.parquet", 4)
    table = pq.read_table(data)
    first_wins = [v >= 0.5 for v in table.column("label_0").to_pylist()]
    for name, values in (("e_0", [0.0 if w else 1.0 for w in first_wins]), ("e_1", [1.0 if w else 0.0 for w in first_wins])):
        table = table.append_column(name, pa.array(values, type=pa.float64()))
    pq.write_table(table, data)
    config = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [
        f"model.path={TOY_BASE}", f"data.path={data}", f"output_dir={tmp_path / 'run'}", "data.ensemble=weight",
        "data.ensemble_columns=[[e_0, e_1]]", "train.max_steps=2", "train.batch_size=2", "validation.every=0"])
    train(config)
    weights = load_file(tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors")
    assert all(v.abs().max() == 0 for k, v in weights.items() if ".lora.up." in k or "lora_B" in k)


def test_a_kept_tie_keeps_its_weight_under_ensemble_weight(tmp_path):
    """No model can back either image of a tie, so data.ensemble=weight leaves a kept tie's weight at 1."""
    data = pickapic_parquet(tmp_path / "pairs.parquet", 4, tie_rows=(3,))
    pairs = PairDataset(data, resolution=32, ties="soft", ensemble_columns=[("aes_0", "aes_1")], ensemble="weight")
    tie = next(pairs.read(p, decode=False) for p in range(len(pairs)) if pairs.read(p, decode=False).index == 3)
    assert tie.preference == 0.5 and tie.weight == 1.0


def test_ensemble_soften_gives_each_pair_the_models_mean_probability_for_its_label(tmp_path):
    """soften: preference = mean over models of sigma(d_m), d_m the scaled strength for the labelled winner (the
    winner is read first); a pair the ensemble disputes falls below 1/2. Soft-label losses only."""
    data = _flip(pickapic_parquet(tmp_path / "pairs.parquet", 6), {1, 2})
    table = pq.read_table(data).to_pydict()
    columns = [("pick_0", "pick_1"), ("aes_0", "aes_1")]
    first = torch.tensor([[table[a][i] for a, _ in columns] for i in range(6)], dtype=torch.float64)
    second = torch.tensor([[table[b][i] for _, b in columns] for i in range(6)], dtype=torch.float64)
    differences = first - second
    scaled = differences / differences.std(dim=0, correction=0)
    signs = torch.tensor([1.0 if v >= 0.5 else -1.0 for v in table["label_0"]], dtype=torch.float64)
    expected = torch.sigmoid(scaled * signs[:, None]).mean(dim=1)
    soft = PairDataset(data, resolution=32, ensemble_columns=columns, ensemble="soften")
    got = [soft.read(p, decode=False).preference for p in range(6)]
    assert got == pytest.approx(expected.tolist())
    assert got[2] < 0.5 < got[0]  # row 2: both models against its (flipped) label
    with pytest.raises(UserError, match="data.ensemble=soften .* needs a soft-label loss"):
        load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [f"data.path={tmp_path}", "data.ensemble=soften",
                                                              "data.ensemble_columns=[[pick_0, pick_1]]"])
    config = load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [
        f"data.path={tmp_path}", "data.ensemble=soften", "data.ensemble_columns=[[pick_0, pick_1]]",
        "objective.loss=soft_dpo"])
    assert config.data.ensemble == "soften"
