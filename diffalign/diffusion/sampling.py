"""Generate images with a diffusers pipeline, one seed per image, in batches.

Each image gets its own ``torch.Generator`` seeded from its seed, so an image depends only
on (model, prompt, seed, settings), never on the batch it was drawn in: base and aligned
models compared "at the same seeds" start from the same noise.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from diffalign.diffusion.backbones import sliced_decoding


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 20,
    guidance_scale: float = 5.0,
    resolution: int | None = None,
    batch_size: int = 64,
    progress: bool | str = False,
    **pipeline_kwargs,
) -> torch.Tensor:
    """Images for ``prompts[i]`` from ``seeds[i]``, float (N, 3, H, W) in [0, 1] on the CPU.

    ``progress``: a bar over the batches, labelled with the string given (what is generated, for whom).
    Extra keyword arguments go to the pipeline call (negative prompts, callbacks, ...). The VAE
    decodes one image at a time (:func:`~diffalign.diffusion.backbones.sliced_decoding`).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")
    pipe.set_progress_bar_config(disable=True)
    device = pipe._execution_device
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    out = []
    with sliced_decoding(getattr(pipe, "vae", None)):
        label = progress if isinstance(progress, str) else "generating images"
        for start in tqdm(range(0, len(prompts), batch_size), desc=label, unit="batch", disable=not progress):
            chunk = slice(start, start + batch_size)
            generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds[chunk]]
            images = pipe(prompt=list(prompts[chunk]), num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=generators, output_type="pt", **size, **pipeline_kwargs).images
            out.append(images.float().cpu())
    return torch.cat(out)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
