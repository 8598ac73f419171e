"""Generate images with a diffusers pipeline, one seed per image, in batches.

Each image gets its own ``torch.Generator`` seeded from its seed, so an image depends only
on (model, prompt, seed, settings), never on the batch it was drawn in: base and aligned
models compared "at the same seeds" start from the same noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from diffalign.diffusion.backbones import BACKBONES, Backbone, backbone_class, sliced_decoding
from diffalign.errors import UserError


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 20,
    guidance_scale: float = 5.0,
    resolution: int | None = None,
    width: int | None = None,
    batch_size: int = 64,
    progress: bool | str = False,
    sources: Sequence[Sequence[Image.Image]] | None = None,
    frames: int = 0,
    **pipeline_kwargs,
) -> torch.Tensor:
    """Images for ``prompts[i]`` from ``seeds[i]``, float (N, 3, H, W) in [0, 1] on the CPU; on a video pipeline
    clips of ``frames`` frames, (N, 3, F, H, W) (``frames`` 0: images, one-frame clips, as (N, 3, H, W)). They are
    ``resolution`` pixels high and ``width`` wide (``width`` None: square; both None: the pipeline's default size).

    ``guidance_scale`` goes to the pipeline as its family guides (``Backbone.pipeline_guidance``: the Qwen-Image
    pipelines' true CFG, ``guidance_scale`` elsewhere). ``sources[i]``: the source images image i edits, given to
    an edit pipeline's ``image`` (one image at a time, as the edit pipelines batch no sources).
    ``progress``: a bar over the batches, labelled with the string given (what is generated, for whom).
    Extra keyword arguments go to the pipeline call (negative prompts, callbacks, ...). The VAE
    decodes one image at a time (:func:`~diffalign.diffusion.backbones.sliced_decoding`).
    """
    if len(prompts) != len(seeds) or (sources is not None and len(sources) != len(prompts)):
        raise ValueError(f"got {len(prompts)} prompts, {len(seeds)} seeds and "
                         f"{'no' if sources is None else len(sources)} sources; give one seed (and sources) per image")
    family = backbone_class(pipe) if type(pipe).__name__ in BACKBONES else Backbone
    if sources is not None:
        pipe = family.pipeline_with_sources(pipe)
    if frames and not family.video:
        raise UserError(f"{type(pipe).__name__} makes images, not clips of {frames} frames: leave --frames (frames) "
                        "out for an image model")
    if "max_sequence_length" in pipeline_kwargs and not family.prompt_tokens_settable:
        raise UserError(f"{type(pipe).__name__}'s text encoders read a fixed number of tokens: its prompts cannot be "
                        f"encoded to {pipeline_kwargs['max_sequence_length']} (leave --prompt-tokens out)")
    if family.video:
        pipeline_kwargs = {"num_frames": max(frames, 1), **pipeline_kwargs}
    if sources is not None:
        batch_size = 1
    pipe.set_progress_bar_config(disable=True)
    family.prepare_pipeline(pipe, guidance_scale)
    device = pipe._execution_device
    if width is not None and resolution is None:
        raise UserError(f"a width of {width} px needs the height too: give the resolution (--resolution) beside it")
    size = {} if resolution is None else family.pipeline_size(pipe, resolution, width or resolution)
    out = []
    with sliced_decoding(getattr(pipe, "vae", None)):
        label = progress if isinstance(progress, str) else "generating images"
        for start in tqdm(range(0, len(prompts), batch_size), desc=label, unit="batch", disable=not progress):
            chunk = slice(start, start + batch_size)
            generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds[chunk]]
            guidance = {key: value for key, value in family.pipeline_guidance(guidance_scale, len(generators)).items()
                        if key not in pipeline_kwargs}  # a caller's own (FLUX's --true-cfg) stand
            edit = {} if sources is None else {"image": family.pipeline_images(sources[start])}
            result = pipe(prompt=list(prompts[chunk]), num_inference_steps=steps, generator=generators,
                          output_type="pt", **guidance, **edit, **size, **pipeline_kwargs)
            if family.video:  # (N, F, 3, H, W) clips
                clips = result.frames.float().cpu().transpose(1, 2)
                out.append(clips if frames else clips[:, :, 0])
            else:
                out.append(result.images.float().cpu())
    return torch.cat(out)


CLIP_FPS = 16  # the frame rate clips are written at: Wan2.1's


def save_media(image: torch.Tensor, stem: Path, fps: float = CLIP_FPS) -> Path:
    """An image (3, H, W) in [0, 1] as ``stem.png``; a clip (3, F, H, W) as an animated ``stem.webp`` (which browsers,
    the labelling page and image viewers play) with its first frame as ``stem.png`` beside it (what the image
    statistics read). Returns the file to show."""
    if image.dim() == 3:
        to_pil(image).save(stem.with_suffix(".png"))
        return stem.with_suffix(".png")
    frames = [to_pil(frame) for frame in image.unbind(1)]
    frames[0].save(stem.with_suffix(".png"))
    frames[0].save(stem.with_suffix(".webp"), save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0, lossless=True)
    return stem.with_suffix(".webp")


def shown_media(stem: Path) -> Path:
    """The file :func:`save_media` wrote to show for ``stem``: the clip's animation if there is one, else the PNG."""
    clip = stem.with_suffix(".webp")
    return clip if clip.is_file() else stem.with_suffix(".png")


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
