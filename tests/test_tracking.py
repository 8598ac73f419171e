"""What a run hands its trackers: the config as flat scalar hyperparameters, the logged scalars, and the
validation grids as images, in tensorboard and in wandb (offline, nothing sent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures import pickapic_parquet
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.train import load_config, train
from diffalign.train.config import to_dict
from diffalign.train.tracking import flat_hyperparameters


def test_the_config_becomes_dotted_scalars_that_tensorboard_takes(tmp_path):
    config = load_config(CONFIGS / "sdxl_dpo.yaml", ["objective.loss_options={label_smoothing: 0.1}"])
    flat = flat_hyperparameters(to_dict(config))
    assert flat["train.learning_rate"] == 1e-5 and flat["model.gradient_checkpointing"] is True
    assert flat["train.lora_targets"] == "['to_q', 'to_k', 'to_v', 'to_out.0']"
    assert flat["train.resume"] == "None" and flat["objective.loss_options.label_smoothing"] == 0.1
    assert flat["validation.rewards"] == "[]"  # an empty list stays a value, not a vanished key
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    SummaryWriter(str(tmp_path)).add_hparams(flat, {})  # what accelerate's tensorboard tracker calls
    with pytest.raises(ValueError):  # the nested config, as it went before
        SummaryWriter(str(tmp_path)).add_hparams(to_dict(config), {})


def _toy_run(tmp_path: Path, tracker: str) -> Path:
    data = pickapic_parquet(tmp_path / "pairs.parquet", 4)
    config = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [
        f"model.path={TOY_BASE}", f"data.path={data}", f"output_dir={tmp_path / 'run'}", f"train.report_to={tracker}",
        "train.max_steps=2", "train.batch_size=2", "train.log_every=1", "validation.every=1",
        "validation.images_per_prompt=1", "validation.steps=2"])
    train(config)
    return tmp_path / "run"


def test_tensorboard_holds_the_scalars_the_hyperparameters_and_the_validation_grids(tmp_path):
    run = _toy_run(tmp_path, "tensorboard")
    events = EventAccumulator(str(run / "diffalign"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"loss", "implicit_acc", "lr", "val_toy_preference", "val_toy_adherence"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    grids = events.Images("validation/samples")
    assert [g.step for g in grids] == [0, 1, 2] and all(g.width > g.height > 0 for g in grids)
    assert list((run / "diffalign").rglob("hparams.yml"))  # the flat config, beside the events


@pytest.mark.slow
def test_wandb_offline_gets_the_same(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _toy_run(tmp_path, "wandb")
    import wandb

    wandb.teardown()  # the run's records reach its file from wandb's service process, done only once it stops
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert len(list((offline / "files" / "media" / "images").glob("validation/samples_*.png"))) == 3  # steps 0-2
    record = next(offline.glob("run-*.wandb")).read_bytes()  # protobuf records keep their strings as written
    for logged in (b"val_toy_preference", b"implicit_acc", b"train.lora_targets", b"objective.beta"):
        assert logged in record, logged


@pytest.mark.slow
def test_an_animated_grid_reaches_wandb_as_a_gif_video(tmp_path, monkeypatch):
    """A video run's animated grid (tensorboard's half is checked in tests/test_video.py) reaches wandb (offline, a
    real run) as a GIF video of every frame, the temporary file it was handed removed."""
    import tempfile
    from types import SimpleNamespace

    from PIL import Image

    from diffalign.train.tracking import log_animation

    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = wandb.init(mode="offline", dir=tmp_path, project="diffalign-test")
    frames = [Image.new("RGB", (16, 8), (40 * i, 0, 0)) for i in range(5)]
    log_animation([SimpleNamespace(name="wandb", run=run)], "validation/samples", frames, step=2, fps=16)
    run.finish()
    (video,) = (tmp_path / "wandb").glob("offline-run-*/files/media/videos/validation/samples_*.gif")
    assert Image.open(video).n_frames == 5
    assert not list(tmp_path.glob("*.gif"))
