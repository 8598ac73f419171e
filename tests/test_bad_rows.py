"""A run says what it skipped: each bad row is printed once when first met (the image file where rows
are files), counted once however often it is read, and the run ends with one line of the totals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import pickapic_parquet, png_bytes

from diffalign.data import CaptionedImageDataset, PairDataset
from diffalign.errors import UserError
from diffalign.paths import ROOT
from diffalign.train import load_config, train


@pytest.mark.slow
def test_a_bad_row_read_in_every_epoch_is_printed_and_counted_once(tmp_path, capsys):
    data = pickapic_parquet(tmp_path / "pairs.parquet", 4, corrupt_rows=(1,), nan_rows=(3,))
    # 3 usable pairs, 2 per step, 6 steps: every pair is read 4 times, the corrupt one too
    config = load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [
        f"data.path={data}", f"output_dir={tmp_path / 'run'}", f"model.path={ROOT / 'assets/models/tiny-sdxl'}",
        "train.max_steps=6", "train.checkpoint_every=0", "train.log_every=3"])
    summary = train(config)
    assert summary["skipped_rows"] == {"jpg_1": 1, "label_0": 1}
    logged = [json.loads(line)["skipped_rows"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 2]
    err = capsys.readouterr().err
    assert err.count("skipped a bad row:") == 2
    assert f"skipped a bad row: {data}, row 1, column 'jpg_1': image cannot be decoded" in err
    assert f"skipped a bad row: {data}, row 3, column 'label_0': label must be a number in [0, 1] (1: first image preferred, 0: second, 0.5: tie), got nan" in err
    assert f"skipped 2 bad rows (jpg_1: 1, label_0: 1); see {tmp_path / 'run' / 'metrics.json'}" in err


def _image_folder(folder: Path) -> Path:
    folder.mkdir()
    for i in range(3):
        (folder / f"cat-{i}.png").write_bytes(png_bytes((200, 60, 60), 32, i))
        (folder / f"cat-{i}.txt").write_text(f"a cat number {i}")
    (folder / "cat-1.png").write_bytes(b"not a png")
    (folder / "cat-2.txt").unlink()  # an image without a caption
    return folder


def test_in_a_folder_of_images_the_bad_row_is_named_by_its_file(tmp_path, capsys):
    folder = _image_folder(tmp_path / "photos")
    dataset = CaptionedImageDataset(folder, resolution=16)
    assert [dataset.example(i) is None for i in range(len(dataset))] == [False, True, True]
    assert dataset.example(1) is None  # read again: the same bad row
    assert dataset.skipped == {"image": 1, "caption": 1}
    err = capsys.readouterr().err
    assert err.count("skipped a bad row") == 2
    assert f"{folder / 'cat-1.png'} (row 1, column 'image'): image cannot be decoded" in err
    assert f"{folder / 'cat-2.png'} (row 2, column 'caption'): caption is missing or empty" in err
    raising = CaptionedImageDataset(folder, resolution=16, on_error="raise")
    with pytest.raises(UserError, match=f"bad data: {folder / 'cat-1.png'}"):
        raising.example(1)


def test_past_ten_bad_rows_of_a_column_they_are_counted_not_printed(tmp_path, capsys):
    data = PairDataset(pickapic_parquet(tmp_path / "p.parquet", 14, nan_rows=range(12)), resolution=16)
    assert data.skipped == {"label_0": 12}
    err = capsys.readouterr().err
    assert err.count("skipped a bad row") == 10 and "further bad rows of column 'label_0' are counted" in err
