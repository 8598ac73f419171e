"""Per-image labels from pairs (Diffusion-KTO's data from Pick-a-Pic): the authors' three policies by hand."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures import png_bytes

from diffalign.cli import main
from diffalign.data import CaptionedImageDataset
from diffalign.data.labels import pairs_to_labelled_images
from diffalign.errors import UserError

IMAGES = {name: png_bytes((30 * i, 80, 200 - 30 * i), 16, i) for i, name in enumerate("ABCDEF")}
# (caption, first image, second image, label_0): A beats B and C, B beats C, D-E is a tie, F beats D by a
# soft label, row 5 has no caption, A-B again under another caption (other images: a label is per prompt), and C
# against itself (no information).
PAIRS = [("one", "A", "B", 1.0), ("one", "C", "A", 0.0), ("one", "B", "C", 1.0), ("two", "D", "E", 0.5),
         ("two", "D", "F", 0.3), ("", "A", "C", 1.0), ("three", "A", "B", 1.0), ("one", "C", "C", 1.0)]
# (caption, image, wins, losses) in order of first appearance; B under "one" both won and lost.
TALLY = [("one", "A", 2, 0), ("one", "B", 1, 1), ("one", "C", 0, 2), ("two", "F", 1, 0), ("two", "D", 0, 1),
         ("three", "A", 1, 0), ("three", "B", 0, 1)]


def _pairs_parquet(path):
    pq.write_table(pa.table({"caption": [c for c, *_ in PAIRS], "jpg_0": [IMAGES[a] for _, a, _, _ in PAIRS],
                             "jpg_1": [IMAGES[b] for _, _, b, _ in PAIRS], "label_0": [p for *_, p in PAIRS]}),
                   path)
    return path


def _rows(folder):
    return [row for shard in sorted(folder.glob("*.parquet")) for row in pq.read_table(shard).to_pylist()]


@pytest.mark.parametrize("mixed,label_of_b", [("liked", 1), ("disliked", 0), ("drop", None)])
def test_an_image_is_liked_when_it_never_lost_and_mixed_ones_follow_the_policy(tmp_path, mixed, label_of_b):
    summary = pairs_to_labelled_images(_pairs_parquet(tmp_path / "pairs.parquet"), tmp_path / "out", mixed=mixed,
                                       rows_per_shard=3)
    expected = [(caption, IMAGES[image], label_of_b if wins and losses else int(losses == 0), wins, losses)
                for caption, image, wins, losses in TALLY]
    expected = [row for row in expected if row[2] is not None]
    rows = _rows(tmp_path / "out")
    assert [(r["caption"], r["image"], r["label"], r["wins"], r["losses"]) for r in rows] == expected
    assert len(list((tmp_path / "out").glob("*.parquet"))) == -(-len(expected) // 3)
    assert summary["pairs_used"] == 5 and summary["bad_rows"] == {"caption": 1} and summary["won_and_lost"] == 1
    assert summary["liked"] == sum(r[2] for r in expected) and summary["images"] == len(TALLY)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary

    dataset = CaptionedImageDataset(tmp_path / "out", resolution=16, label_column="label", on_error="raise")
    liked, other = dataset.positions_by_label()
    assert [dataset.read(p).caption for p in liked] == [r[0] for r in expected if r[2] == 1]
    assert len(other) == len(expected) - len(liked)


def test_a_jsonl_index_of_pairs_gives_an_index_of_the_same_files(tmp_path):
    folder = tmp_path / "pick" / "images"
    folder.mkdir(parents=True)
    for name, data in IMAGES.items():
        (folder / f"{name}.png").write_bytes(data)
    lines = [{"caption": c, "jpg_0": f"images/{a}.png", "jpg_1": f"images/{b}.png", "label_0": p}
             for c, a, b, p in PAIRS]
    lines.append({"caption": "four", "jpg_0": "images/missing.png", "jpg_1": "images/A.png", "label_0": 1.0})
    (tmp_path / "pick" / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))

    summary = pairs_to_labelled_images(tmp_path / "pick" / "pairs.jsonl", tmp_path / "labels" / "kto")
    assert summary["bad_rows"] == {"caption": 1, "jpg_0": 1}
    dataset = CaptionedImageDataset(tmp_path / "labels" / "kto", resolution=16, label_column="label",
                                    on_error="raise")  # the folder: it holds one index
    assert dataset.source.path == tmp_path / "labels" / "kto" / "images.jsonl"
    assert len(dataset) == len(TALLY) and not list((tmp_path / "labels" / "kto").glob("*.png"))
    for position, (caption, image, wins, losses) in enumerate(TALLY):
        example = dataset.read(position)
        assert example.caption == caption and dataset.labels[example.index] == float(wins > 0)
        assert example.image_ids == (hashlib.sha1(IMAGES[image]).hexdigest(),)


def test_an_existing_folder_is_never_overwritten_and_bad_options_are_refused(tmp_path):
    pairs = _pairs_parquet(tmp_path / "pairs.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists"):
        pairs_to_labelled_images(pairs, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="mixed must be one of"):
        pairs_to_labelled_images(pairs, tmp_path / "new", mixed="win")
    with pytest.raises(UserError, match="no column 'jpg_9'"):
        pairs_to_labelled_images(pairs, tmp_path / "new", image_columns=("jpg_0", "jpg_9"))
    assert not (tmp_path / "new").exists()


def test_an_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    import diffalign.data.labels as labels

    def interrupted(pairs, labelled, folder, rows_per_shard):
        (folder / "labelled-00000.parquet").write_bytes(b"half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(labels, "_write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pairs_to_labelled_images(_pairs_parquet(tmp_path / "pairs.parquet"), tmp_path / "out" / "kto")
    assert list((tmp_path / "out").iterdir()) == []


def test_the_command_prints_the_counts_and_the_data_path_to_train_on(tmp_path, capsys):
    pairs = _pairs_parquet(tmp_path / "pairs.parquet")
    assert main(["pairs-to-labels", str(pairs), str(tmp_path / "kto"), "--mixed", "drop"]) == 0
    out = capsys.readouterr().out
    assert "5 pairs (1 bad rows skipped) -> 7 images: 3 liked, 3 not; 1 both won and lost (mixed=drop)" in out
    assert f"data.path={tmp_path / 'kto'} data.label_column=label" in out
    assert main(["pairs-to-labels", str(pairs), str(tmp_path / "kto")]) == 2


def test_verify_skips_pairs_whose_images_do_not_decode(tmp_path):
    from fixtures import pickapic_parquet

    pairs = pickapic_parquet(tmp_path / "pairs.parquet", 6, corrupt_rows=(2,))
    hashed = pairs_to_labelled_images(pairs, tmp_path / "hashed")
    verified = pairs_to_labelled_images(pairs, tmp_path / "verified", verify=True)
    assert hashed["pairs_used"] == 6 and hashed["bad_rows"] == {}  # the corrupt image passes unnoticed
    assert verified["pairs_used"] == 5 and verified["bad_rows"] == {"jpg_1": 1}
    assert verified["images"] == hashed["images"] - 2
    assert b"definitely not an image" in [row["image"] for row in _rows(tmp_path / "hashed")]
    assert b"definitely not an image" not in [row["image"] for row in _rows(tmp_path / "verified")]
