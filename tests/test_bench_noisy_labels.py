"""scripts/bench_noisy_labels.py, where the flipped-label table of docs/train.md comes from: the flipped copy of the
pairs reverses exactly the asked share of labels, and the reader then puts those pairs' losers first."""

from __future__ import annotations

import pyarrow.parquet as pq
from fixtures import pickapic_parquet, script_module

from diffalign.data import PairDataset


def test_flip_labels_reverses_the_asked_share_of_pairs_and_the_reader_follows(tmp_path):
    pairs = pickapic_parquet(tmp_path / "pairs.parquet", 10)
    flipped = script_module("bench_noisy_labels").flip_labels(pairs, tmp_path / "flipped.parquet", 0.4, seed=0)
    before, after = (pq.read_table(p).column("label_0").to_pylist() for p in (pairs, flipped))
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert len(changed) == 4 and all(after[i] == 1 - before[i] for i in changed)
    assert script_module("bench_noisy_labels").flip_labels(pairs, tmp_path / "again.parquet", 0.4, seed=0).read_bytes() == flipped.read_bytes()
    clean, noisy = (PairDataset(p, resolution=32) for p in (pairs, flipped))
    for i in range(10):
        ids = clean.read(i, decode=False).image_ids
        assert noisy.read(i, decode=False).image_ids == (ids[::-1] if i in changed else ids)


def test_the_noisy_ensemble_adds_seeded_score_columns_that_the_filter_reads(tmp_path):
    script = script_module("bench_noisy_labels")
    pairs = pickapic_parquet(tmp_path / "pairs.parquet", 10)
    table = pq.read_table(pairs)
    table = table.append_column("score_0", table.column("pick_0")).append_column("score_1", table.column("pick_1"))
    pq.write_table(table, pairs)
    flipped = script.flip_labels(pairs, tmp_path / "flipped.parquet", 0.4, seed=0)
    columns = script.add_noisy_ensemble(flipped, models=3, noise=0.0)  # noiseless: the models are the scores
    assert columns == [["rm0_0", "rm0_1"], ["rm1_0", "rm1_1"], ["rm2_0", "rm2_1"]]
    counts = script.filter_accuracy(pairs, flipped, columns)
    before, after = (pq.read_table(p).column("label_0").to_pylist() for p in (pairs, flipped))
    # exact scores find every flip, but row 0's, whose two images score the same (a tie says nothing)
    found = sum(1 for i, (a, b) in enumerate(zip(before, after)) if a != b and i != 0)
    assert counts == {"dropped": found, "dropped_flipped": found, "flipped": 4}
