"""Generate images with a diffusers pipeline, one seed per image, in batches.

Each image gets its own ``torch.Generator`` seeded from its seed, so an image depends only
on (model, prompt, seed, settings), never on the batch it was drawn in: base and aligned
models compared "at the same seeds" start from the same noise.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm


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
    progress: bool = False,
    **pipeline_kwargs,
) -> torch.Tensor:
    """Images for ``prompts[i]`` from ``seeds[i]``, float (N, 3, H, W) in [0, 1] on the CPU.

    Extra keyword arguments go to the pipeline call (negative prompts, callbacks, ...). While it
    generates, the pipeline's VAE decodes one image at a time (diffusers' sliced decoding), since
    SDXL's VAE peaks at about 3.8 GiB per 1024 px image in fp32, and a batch decoded at once would
    need that many times over. The setting is put back afterwards: it slices encoding too, and a
    trainer sharing the VAE must encode as it did before a validation.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")
    pipe.set_progress_bar_config(disable=True)
    vae = getattr(pipe, "vae", None)
    sliced_before = getattr(vae, "use_slicing", True)
    if not sliced_before:
        vae.enable_slicing()
    device = pipe._execution_device
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    out = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            chunk = slice(start, start + batch_size)
            generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds[chunk]]
            images = pipe(list(prompts[chunk]), num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=generators, output_type="pt", **size, **pipeline_kwargs).images
            out.append(images.float().cpu())
    finally:
        if not sliced_before:
            vae.disable_slicing()
    return torch.cat(out)
