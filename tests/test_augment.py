"""Left-right flips (``data.random_flip``): each image's flip is a function of (seed, position, item),
and training with flips is training on the flipped images themselves, through the latent cache too."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import pickapic_parquet
from PIL import Image, ImageOps
from safetensors.torch import load_file

from diffalign.data import PairDataset
from diffalign.data.augment import FLIPPED, RandomFlip
from diffalign.data.order import DeterministicOrder
from diffalign.train import load_config, train

ROOT = Path(__file__).resolve().parent.parent


def test_each_image_flips_on_its_own_by_seed_and_position(tmp_path):
    flip = RandomFlip(seed=0)
    assert flip.flags(5, 2) == flip.flags(5, 2) == RandomFlip(seed=0).flags(5, 2)
    flags = [f for position in range(200) for f in flip.flags(position, 2)]
    assert 170 <= sum(flags) <= 230  # 400 fair draws: 200 +- 3 standard deviations (10 each)
    assert flags[0::2] != flags[1::2]  # a pair's images are not flipped together
    assert [f for p in range(200) for f in RandomFlip(seed=1).flags(p, 2)] != flags

    example = PairDataset(pickapic_parquet(tmp_path / "pairs.parquet", 2), resolution=32).read(0)
    both = next(p for p in range(100) if flip.flags(p, 2) == [True, False])
    flipped = flip(both, example)
    torch.testing.assert_close(flipped.pixels[0], example.pixels[0].flip(-1), rtol=0, atol=0)  # mirrored columns
    torch.testing.assert_close(flipped.pixels[1], example.pixels[1], rtol=0, atol=0)
    assert flipped.image_ids == (example.image_ids[0] + FLIPPED, example.image_ids[1])
    hashed = PairDataset(tmp_path / "pairs.parquet", resolution=32).read(0, decode=False)
    assert flip(both, hashed).image_ids == flipped.image_ids and flip(both, hashed).pixels is None


def _mirrored(png: bytes) -> bytes:
    out = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(png))).save(out, format="PNG")
    return out.getvalue()


def _config(data: Path, out: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [
        f"data.path={data}", f"output_dir={out}", f"model.path={ROOT / 'assets/models/tiny-sd15'}",
        "train.max_steps=4", "train.checkpoint_every=0", "train.learning_rate=1e-2", *overrides])


@pytest.mark.slow
def test_training_with_flips_is_training_on_the_flipped_images(tmp_path):
    """One epoch of 8 pairs with ``data.random_flip`` (latents cached) gives the weights of the same run
    without flips on a table whose images were mirrored where the flips fell, and other weights than no flips."""
    data = pickapic_parquet(tmp_path / "pairs.parquet", 8)  # 32 px images at resolution 32: no resize or crop
    table = pq.read_table(data).to_pydict()
    order, flip = DeterministicOrder(8, seed=0), RandomFlip(seed=0)
    for position in range(8):
        row = order[position]
        winner_first = ["jpg_0", "jpg_1"] if table["label_0"][row] == 1.0 else ["jpg_1", "jpg_0"]
        for column, flipped in zip(winner_first, flip.flags(position, 2)):
            if flipped:
                table[column][row] = _mirrored(table[column][row])
    mirrored = tmp_path / "mirrored.parquet"
    pq.write_table(pa.table(table), mirrored)

    train(_config(data, tmp_path / "flips", "data.random_flip=true", f"data.cache_dir={tmp_path / 'cache'}"))
    train(_config(mirrored, tmp_path / "mirrored", f"data.cache_dir={tmp_path / 'cache-mirrored'}"))
    train(_config(data, tmp_path / "plain", f"data.cache_dir={tmp_path / 'cache-plain'}"))
    weights = {name: load_file(tmp_path / name / "final" / "pytorch_lora_weights.safetensors")
               for name in ("flips", "mirrored", "plain")}
    for key, value in weights["mirrored"].items():
        torch.testing.assert_close(weights["flips"][key], value, msg=key)
    assert any(not torch.allclose(weights["flips"][k], v) for k, v in weights["plain"].items())
