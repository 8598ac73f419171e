"""Images on disk that a long job can stop and continue from (``generate-ranked``, ``eval --save-images``).

A PNG (a video model's clip: a lossless animated WebP, every frame exact) is written to a temporary name and renamed,
so a file that exists is whole; a job that
is stopped and run again reuses every image already there. Images are scored as they are
read back (8-bit), so a resumed job scores exactly what an uninterrupted one does. The
settings that made a folder are recorded in it on first use, and a rerun with other settings is
refused instead of mixing two jobs' images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError

from diffalign.errors import UserError
from diffalign.diffusion.sampling import CLIP_FPS, to_pil


def saved_suffix(clips: bool) -> str:
    """The file type a saved image (.png) or clip (.webp) has."""
    return ".webp" if clips else ".png"


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write a (3, H, W) image in [0, 1] to ``path`` atomically (whole or absent); a clip (3, F, H, W) as a lossless
    animated WebP."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if image.dim() == 3:
        to_pil(image).save(tmp, format="PNG")
    else:
        frames = [to_pil(frame) for frame in image.unbind(1)]
        frames[0].save(tmp, format="WEBP", save_all=True, append_images=frames[1:], lossless=True,
                       duration=round(1000 / CLIP_FPS), loop=0)
    os.replace(tmp, path)


def load_png(path: Path) -> torch.Tensor:
    """A saved image as a (3, H, W) float tensor in [0, 1]; a saved clip (an animated WebP) as (3, F, H, W)."""
    def pixels(frame: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(frame.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)

    with Image.open(path) as image:
        if path.suffix != ".webp":
            return pixels(image)
        frames = []
        for index in range(image.n_frames):
            image.seek(index)
            frames.append(pixels(image))
        return torch.stack(frames, dim=1)


def load_saved(paths: list[Path]) -> torch.Tensor | None:
    """The images at ``paths`` stacked, or None if any is missing or unreadable (then they are made again)."""
    try:
        return torch.stack([load_png(p) for p in paths])
    except (OSError, UnidentifiedImageError):
        return None


def check_same_settings(record: Path, settings: dict[str, Any], *, what: str, fix: str) -> None:
    """Record ``settings`` in ``record`` on first use; later, refuse settings that differ from them."""
    if record.is_file():
        previous = yaml.safe_load(record.read_text())
        if previous != settings:
            changed = sorted(k for k in {*settings, *previous} if previous.get(k) != settings.get(k))
            raise UserError(f"{record.parent} holds {what} made with a different config "
                            f"(changed: {', '.join(changed)}); {fix}")
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(yaml.safe_dump(settings, sort_keys=False))
