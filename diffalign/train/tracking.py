"""What a run hands its experiment trackers (tensorboard, wandb): the config as flat scalar
hyperparameters, and the validation grids as images (a video run's as animations).

accelerate's tensorboard tracker passes the config to torch's ``SummaryWriter.add_hparams``, which
takes only int, float, str, bool and tensor values: a nested config (``{"train": {...}}``) or a list
(``lora_targets``) stops the run before its first step. wandb takes nested configs, but shows flat
keys the same way, so both get the one flat form.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Mapping

import numpy as np
from PIL import Image

Scalar = int | float | str | bool


def flat_hyperparameters(config: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """``config`` as ``{"train.learning_rate": 1e-5, ...}``: sections become dotted keys, numbers,
    strings and booleans stay as they are, and everything else (lists, None, mappings inside a value such
    as ``loss_options``) becomes its string (``"['to_q', 'to_k']"``, ``"None"``), so every tracker takes it."""
    flat: dict[str, Scalar] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_hyperparameters(value, dotted + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[dotted] = value
        else:
            flat[dotted] = str(value)
    return flat


def log_image(trackers: list[Any], name: str, image: Image.Image, step: int) -> None:
    """Hand one image (a validation grid) to every tracker of the run, under ``name`` at ``step``."""
    array = np.asarray(image.convert("RGB"))
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, array, global_step=step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.run.log({name: wandb.Image(image)}, step=step)


def log_animation(trackers: list[Any], name: str, frames: list[Image.Image], step: int, fps: float) -> None:
    """Hand an animated validation grid (a video run's: one grid per frame) to every tracker of the run, as an
    animated GIF at ``fps``. Tensorboard's image dashboard plays a GIF in an image summary, which is what its
    ``add_video`` writes, but that needs moviepy to encode it: here PIL encodes it and the summary is written as
    ``add_video`` would. wandb takes the GIF as a ``wandb.Video`` from a file, which it copies at once."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    rgb = [frame.convert("RGB") for frame in frames]
    buffer = io.BytesIO()
    rgb[0].save(buffer, format="GIF", save_all=True, append_images=rgb[1:], duration=round(1000 / fps), loop=0)
    gif = buffer.getvalue()
    for tracker in trackers:
        if tracker.name == "tensorboard":
            image = Summary.Image(height=rgb[0].height, width=rgb[0].width, colorspace=3, encoded_image_string=gif)
            tracker.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)
        elif tracker.name == "wandb":
            import wandb

            handle, path = tempfile.mkstemp(suffix=".gif")
            try:
                with os.fdopen(handle, "wb") as f:
                    f.write(gif)
                tracker.run.log({name: wandb.Video(path, format="gif")}, step=step)
            finally:
                os.unlink(path)
