"""Whether a model is a step-distilled one, by the names its releases carry, and what training it means.

Step-distilled models (FLUX.1-schnell, Z-Image-Turbo, FLUX.2 klein, SDXL-Turbo/Lightning/Hyper, LCM) were taught
to make an image in a few steps, often with guidance folded in. Preference training moves their denoiser with a
loss that knows nothing of that few-step sampler, and peers' users report blurry or washed-out images after RL on
them (Flow-Factory issues #192 and #225). diffalign trains them, and says so at the start of the run: train the
undistilled base where one is released, or evaluate at the distilled model's own step count and watch the images.
The check reads names only (a Hub id or a folder): it can miss a renamed copy, never stop a run.
"""

from __future__ import annotations

import re
from pathlib import Path

# a name part -> the distilled family it marks (FLUX.2 klein's "base" releases are undistilled)
_MARKS = [(r"schnell", "FLUX.1-schnell"), (r"turbo", "a Turbo model"), (r"klein(?!.*base)", "FLUX.2 klein"),
          (r"lightning", "a Lightning model"), (r"hyper", "a Hyper-SD model"), (r"\blcm\b|latent-consistency", "an LCM"),
          (r"distill", "a distilled model")]


def distilled_family(model_path: str | Path) -> str | None:
    """Which step-distilled family ``model_path`` names (its last two parts: owner/name or folder), or None."""
    name = "/".join(Path(str(model_path)).parts[-2:]).lower().replace("_", "-")
    return next((family for pattern, family in _MARKS if re.search(pattern, name)), None)


def distilled_warning(model_path: str | Path) -> str | None:
    """The sentence a run on a step-distilled model starts with; None for any other model."""
    family = distilled_family(model_path)
    if family is None:
        return None
    return (f"warning: {model_path} reads as {family}, a step-distilled model: preference training moves it away "
            "from the few-step sampler it was distilled for (peers report blurry images after RL on such models). "
            "Train its undistilled base where there is one, or evaluate at its own step count and look at the images.")
