"""One adapter interface over diffusers pipelines: SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1, PixArt.

An objective is written once against :class:`Backbone`: encode prompts, encode images to
latents, and call the denoiser on noisy latents. Each family's adapter knows its own text
encoders (through the pipeline's own ``encode_prompt``), conditioning (SDXL's pooled
embeddings and size/crop time ids, SD3's pooled projections, FLUX.1's packed latents, position
ids and guidance embedding, PixArt's attention mask and learned-sigma output) and latent scaling
(SD3's and FLUX.1's shift factor). Latents are (N, C, h, w) for every image family: FLUX.1's 2x2
packing into tokens happens inside :meth:`FluxBackbone.predict`, so objectives never see it. A video family (Wan)
has (N, C, F, h, w) latents and (N, 3, F, H, W) pixels; the objectives' per-sample reductions flatten whatever
follows the batch axis, so they train either.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffalign.diffusion.experts import ExpertPair
from diffalign.errors import UserError

Tensor = torch.Tensor


@contextmanager
def sliced_decoding(vae: nn.Module | None) -> Iterator[None]:
    """diffusers' sliced VAE decoding (one image per decode) for the duration, then as it was.

    SDXL's VAE peaks at about 3.8 GiB per 1024 px image in fp32 (measured on CPU): a D3PO round of 32
    images, or an evaluation batch of 16, decoded at once would want 60-120 GiB. The setting is put
    back because it slices encoding too, and a trainer sharing the VAE must encode as it did before.
    """
    sliced_before = getattr(vae, "use_slicing", True)  # True: no VAE, or one without slicing
    if not sliced_before:
        vae.enable_slicing()
    try:
        yield
    finally:
        if not sliced_before:
            vae.disable_slicing()


@dataclass
class Conditioning:
    """Text conditioning of N prompts: what the family's denoiser consumes.

    Attributes:
        embeds: (N, L, D) token embeddings.
        pooled: (N, P) pooled embeddings (SDXL text_embeds, SD3 pooled_projections), or None.
        mask: (N, L) attention mask of the tokens (PixArt), or None.
        reference: (N, S, C, h, w) latents of each prompt's S source images, which an edit model
            (:attr:`Backbone.max_sources`) reads beside the noisy latents; None for text-to-image.
        negative_embeds, negative_mask: the unconditional branch's own embeddings and mask of each item, where
            they depend on the item (an edit model whose text encoder reads the sources,
            :attr:`Backbone.empty_prompt_reads_sources`, sees them in the empty prompt too); None: the one empty prompt
            of every item.
        embeds_2, mask_2: a second text encoder's (N, L2, D2) token embeddings and their mask, for a denoiser that
            reads two streams of them (HunyuanVideo 1.5's ByT5 embeddings of the text to render), or None.
        image_embeds: (N, L3, D3) image-encoder tokens of each item's source image, for a denoiser that reads them
            beside the text (Wan2.1 I2V's CLIP hidden states), or None; the unconditional branch sees them too.
    """

    embeds: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None
    reference: Tensor | None = None
    negative_embeds: Tensor | None = None
    negative_mask: Tensor | None = None
    embeds_2: Tensor | None = None
    mask_2: Tensor | None = None
    image_embeds: Tensor | None = None

    def prompt_embedding(self) -> Tensor:
        """(N, D) one vector per prompt: the pooled embedding where the family has one, else the token embeddings
        averaged over the prompt's tokens (its mask's where it has one)."""
        if self.pooled is not None:
            return self.pooled.float()
        mask = torch.ones(self.embeds.shape[:2], device=self.embeds.device) if self.mask is None else self.mask.float()
        return (self.embeds.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)

    def _map(self, fn) -> "Conditioning":
        return Conditioning(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                               for f in fields(self)})

    def repeat_items(self, k: int) -> "Conditioning":
        """Each prompt repeated k times in a row: prompt i serves items i*k .. i*k+k-1."""
        return self if k == 1 else self._map(lambda t: t.repeat_interleave(k, dim=0))

    def to(self, device=None, dtype=None) -> "Conditioning":
        """Move to a device; floating tensors (not the mask) also to ``dtype``."""
        return Conditioning(**{
            f.name: None if getattr(self, f.name) is None else
            getattr(self, f.name).to(device=device, dtype=None if f.name in ("mask", "mask_2") else dtype)
            for f in fields(self)})

    def __getitem__(self, index) -> "Conditioning":
        return self._map(lambda t: t[index])

    def tensors(self) -> dict[str, Tensor]:
        """The non-empty fields, for caching as safetensors."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def with_negative(self, negative: "Conditioning") -> "Conditioning":
        """This conditioning with ``negative`` (one item each) as each item's unconditional branch."""
        return replace(self, negative_embeds=negative.embeds, negative_mask=negative.mask)

    def guidance_batch(self, uncond: "Conditioning | None") -> "Conditioning":
        """[unconditional branches; the items], for one guided denoiser call: each item's own empty prompt where
        it has one (``negative_embeds``), else ``uncond``; an edit's unconditional branch sees its sources (their
        latents and image tokens), as the pipelines guide."""
        negative = uncond if self.negative_embeds is None else \
            Conditioning(embeds=self.negative_embeds, mask=self.negative_mask)
        for name in ("reference", "image_embeds"):
            if getattr(self, name) is not None and getattr(negative, name) is None:
                negative = replace(negative, **{name: getattr(self, name)})
        return Conditioning.cat([negative, replace(self, negative_embeds=None, negative_mask=None)])

    @classmethod
    def cat(cls, items: list["Conditioning"]) -> "Conditioning":
        """The items one after another; prompts of different token counts (Z-Image's, encoded in batches of their
        own; an edit's, whose source images add tokens) padded to the longest, their mask False on the padding."""
        for embeds, mask in (("embeds", "mask"), ("negative_embeds", "negative_mask")):
            if getattr(items[0], embeds) is None:
                continue
            longest = max(getattr(c, embeds).shape[1] for c in items)
            if all(getattr(c, embeds).shape[1] == longest for c in items):
                continue
            if any(getattr(c, mask) is None for c in items):
                raise ValueError("prompts of different token counts need their attention masks to be joined")
            items = [replace(c, **{embeds: F.pad(getattr(c, embeds), (0, 0, 0, longest - getattr(c, embeds).shape[1])),
                                   mask: F.pad(getattr(c, mask), (0, longest - getattr(c, mask).shape[1]))})
                     for c in items]
        first = items[0]
        return cls(**{
            f.name: None if getattr(first, f.name) is None else torch.cat([getattr(c, f.name) for c in items])
            for f in fields(cls)
        })


def token_shifted_scheduler(scheduler, steps: int, latent_shape: tuple[int, ...]):
    """The grid FluxPipeline and ZImagePipeline sample on: sigmas linspace(1, 1/steps), shifted by the image's
    count of 2x2 latent patches (``mu``, diffusers' ``calculate_shift``) when the scheduler shifts dynamically
    (FLUX.1-dev), by its fixed ``shift`` otherwise."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = type(scheduler).from_config(scheduler.config)
    config = scheduler.config
    tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
    mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    return scheduler


class Backbone:
    """A diffusers pipeline seen through the one interface the objectives use.

    ``denoiser`` is the trainable network (UNet or transformer). Methods that take a
    ``denoiser`` argument run that module instead (a frozen reference copy, say).
    """

    family: ClassVar[str]
    denoiser_attr: ClassVar[str] = "unet"
    # latent pixels per side of one denoiser token: 1 for a UNet; None reads the transformer's own patch_size
    latent_patch: ClassVar[int | None] = 1
    # how many source images an edit model reads beside its noisy latents (``Conditioning.reference``); 0 for a
    # text-to-image model, which a run on edit data (data.source_columns) refuses
    max_sources: ClassVar[int] = 0
    # whether the prompts' conditioning reads the source images too (Qwen-Image-Edit's Qwen2.5-VL, Wan2.1 I2V's CLIP
    # image tokens): its prompts are then encoded with their sources (``encode_prompts(prompts, sources)``) and cached
    # under both
    prompt_reads_sources: ClassVar[bool] = False
    # whether the unconditional branch's empty prompt reads each item's sources too (Qwen-Image-Edit, whose text
    # encoder reads them: ``Conditioning.negative_embeds``); where only image tokens read them (Wan2.1 I2V, HunyuanVideo
    # 1.5 I2V), the one empty prompt serves every item and the item's tokens join it (``Conditioning.guidance_batch``)
    empty_prompt_reads_sources: ClassVar[bool] = False
    # the fewest sources it reads: 1 for a model that only edits (its pipeline needs an image)
    min_sources: ClassVar[int] = 0
    # what it does with its sources, for the errors of a run that gives it none
    source_role: ClassVar[str] = "edits source images"
    # whether the model makes videos: its latents are (N, C, F, h, w) and its pixels (N, 3, F, H, W)
    video: ClassVar[bool] = False
    # whether the pipeline encodes prompts to a length it is given (max_sequence_length), so model.prompt_tokens applies
    prompt_tokens_settable: ClassVar[bool] = True

    def __init__(self, pipe, *, distilled_guidance: float = 3.5, frames: int = 0, expert: str | None = None,
                 prompt_tokens: int | None = None) -> None:
        """``distilled_guidance`` is the value a guidance-distilled denoiser (FLUX.1-dev) is given in its guidance
        embedding when it predicts; denoisers without that embedding ignore it. ``frames``: the frames of a video
        model's clips (``data.frames``; 0 for images, which a video model makes as one-frame clips); an image model
        refuses more than 0. ``expert``: which denoiser of a two-expert model trains (``model.expert``); a model of
        one denoiser refuses it. ``prompt_tokens``: the text encoder's sequence length, prompts padded or cut to it
        (``model.prompt_tokens``; None: :meth:`prompt_length`'s usual one); a model whose text encoders read a fixed
        length refuses it."""
        if prompt_tokens is not None and not self.prompt_tokens_settable:
            raise UserError(f"model.prompt_tokens={prompt_tokens}: {type(pipe).__name__}'s text encoders read a fixed "
                            "number of tokens; leave model.prompt_tokens unset")
        self.prompt_tokens = prompt_tokens
        if expert is not None and not self.two_experts(pipe):
            raise UserError(f"model.expert={expert}: {type(pipe).__name__} here has one denoiser; model.expert picks "
                            "one of a two-expert model's (Wan2.2 A14B)")
        self.pipe = pipe
        self.distilled_guidance = distilled_guidance
        if frames and not self.video:
            raise UserError(f"data.frames={frames} reads videos, and {type(pipe).__name__} makes images: set "
                            f"data.frames=0, or train a video model ({', '.join(sorted(VIDEO_PIPELINES))})")
        self.frames = frames

    def prompt_length(self, tokenizer_limit: int | None = None) -> int:
        """The tokens each prompt is encoded to: ``model.prompt_tokens`` when the run sets it, else what the
        pipeline's own ``__call__`` encodes (its ``max_sequence_length`` default: SD3 256, FLUX 512, PixArt-alpha
        120, PixArt-Sigma 300, Wan 512, Qwen-Image 512), within ``tokenizer_limit`` (the tokenizer's
        ``model_max_length``). Flow-GRPO encodes SD3's T5 prompts to 128 tokens (scripts/train_sd3.py,
        ``max_sequence_length=128``): the joint attention then reads 205 text tokens instead of 333."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        usual = inspect.signature(type(self.pipe).__call__).parameters["max_sequence_length"].default
        return usual if tokenizer_limit is None else min(usual, tokenizer_limit)

    @staticmethod
    def two_experts(pipe) -> bool:
        """Whether the pipeline switches between two denoisers at a timestep (Wan2.2 A14B's ``transformer_2`` with its
        ``boundary_ratio``)."""
        return getattr(pipe, "transformer_2", None) is not None and \
            getattr(pipe.config, "boundary_ratio", None) is not None

    def timestep_share(self) -> tuple[float, float]:
        """The share [lo, hi) of the training schedule's timesteps (index order, noisier up) the trained denoiser
        serves: all of it, except for one expert of two."""
        return (0.0, 1.0)

    def serves(self, timesteps: Tensor) -> Tensor:
        """Which of the model ``timesteps`` (what :meth:`predict` takes) the trained denoiser denoises: all, except
        for one expert of two."""
        return torch.ones(timesteps.shape, dtype=torch.bool, device=timesteps.device)

    @property
    def lora_file_attr(self) -> str:
        """The pipeline component a LoRA file of the trained denoiser is saved under (``save_lora_weights``)."""
        return self.denoiser_attr

    def guidance_embedding(self, n: int, device: torch.device) -> Tensor | None:
        """The guidance value a guidance-distilled denoiser (its config's ``guidance_embeds``) is given for ``n``
        items, ``distilled_guidance`` each; None for a denoiser without that embedding."""
        if not getattr(self.denoiser.config, "guidance_embeds", False):  # the denoiser: the net may be a DDP wrapper
            return None
        return torch.full((n,), self.distilled_guidance, device=device, dtype=torch.float32)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    def frozen_components(self) -> dict[str, nn.Module]:
        """The pipeline's networks other than the denoiser (text encoders, VAE), by component name."""
        return {name: module for name, module in self.pipe.components.items()
                if isinstance(module, nn.Module) and module is not self.denoiser}

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def latent_shape(self, resolution: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image ``resolution`` pixels high and ``width`` wide (None: square)."""
        factor = self.vae_scale_factor
        return (self.latent_channels, resolution // factor, (width or resolution) // factor)

    def sampling_scheduler(self, steps: int, latent_shape: tuple[int, ...]):
        """A fresh copy of the scheduler set to the ``steps``-step inference grid its pipeline samples latents of
        ``latent_shape`` (C, h, w) on."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    # --- latents -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels in [-1, 1], (N, 3, H, W) -> scaled latents (N, C, H/f, W/f).

        Takes the posterior mean unless a ``generator`` is given (then one sample from it),
        so that latents cached once equal latents recomputed later.
        """
        vae = self.vae
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = dist.mean if generator is None else dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> pixels in [-1, 1], one image per VAE call (:func:`sliced_decoding`); differentiable in the
        latents (the VAE's weights are frozen), which the reward-gradient methods follow, so callers that only
        sample call it under ``torch.no_grad``."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
        with sliced_decoding(vae):
            return vae.decode(latents).sample.clamp(-1, 1)

    def encode_sources(self, pixels: Tensor) -> Tensor:
        """An edit's source images, pixels in [-1, 1] (N, 3, H, W) -> what the denoiser reads of each (one item of
        ``Conditioning.reference``): their latents, as :meth:`encode_images`, unless the model conditions otherwise."""
        return self.encode_images(pixels)

    def source_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one :meth:`encode_sources` item for a target of ``latent_shape``."""
        return tuple(latent_shape)

    @property
    def source_cache_kind(self) -> str:
        """What the latent cache files encoded sources under: ``latent`` where they are plain latents (an image's
        entry serves either way), another kind where :meth:`encode_sources` differs."""
        return "latent"

    # --- text ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def empty_prompt(self) -> Conditioning | None:
        """The empty prompt's conditioning, the unconditional branch of guidance shared by every item; None where
        the text encoder reads the sources (each item then carries its own, ``Conditioning.negative_embeds``)."""
        return None if self.empty_prompt_reads_sources else self.encode_prompts([""])

    # --- denoiser ------------------------------------------------------------------------
    def predict(
        self, latents: Tensor, timesteps: Tensor, cond: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """The denoiser's prediction for noisy ``latents`` (N, C, h, w) at ``timesteps`` (N,)."""
        raise NotImplementedError

    def combine_guidance(self, unconditional: Tensor, conditional: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance as the family's pipeline combines its two predictions: u + s (c - u)."""
        return unconditional + scale * (conditional - unconditional)

    @classmethod
    def pipeline_guidance(cls, scale: float, n: int) -> dict:
        """The family's pipeline arguments for guidance ``scale`` on a call of ``n`` prompts: ``guidance_scale``
        (classifier-free guidance, or a distilled model's embedded value)."""
        return {"guidance_scale": scale}

    @classmethod
    def prepare_pipeline(cls, pipe, guidance_scale: float) -> None:
        """Set what a family's pipeline takes as settings rather than call arguments before it samples (nothing for
        most; HunyuanVideo 1.5's guider)."""

    @classmethod
    def pipeline_size(cls, pipe, height: int, width: int) -> dict:
        """The family's pipeline arguments for samples ``height`` x ``width`` pixels."""
        return {"height": height, "width": width}

    def companion_denoisers(self) -> list[nn.Module]:
        """The frozen denoisers :meth:`predict` calls besides :attr:`denoiser` (a two-expert model's other expert,
        where one is trained); none by default."""
        return []

    def finish_sample(self, latents: Tensor, cond: Conditioning) -> Tensor:
        """A sampler's last latents as the pipeline hands them to its VAE after its last step: unchanged, unless the
        model puts a condition back (Wan2.2 TI2V's first frame)."""
        return latents

    @staticmethod
    def pipeline_with_sources(pipe):
        """The pipeline that samples from source images (``diffalign eval --sources``): ``pipe`` itself, unless the
        model's image mode is another pipeline class on the same components."""
        return pipe

    @classmethod
    def pipeline_images(cls, images: list):
        """An edit's source images (PIL) as the family's pipeline takes them: one image, or a list of several."""
        return images[0] if cls.max_sources == 1 else list(images)


class TokenShiftedGrid:
    """For backbones whose pipelines sample on :func:`token_shifted_scheduler`'s grid (FLUX.1, Z-Image,
    Qwen-Image)."""

    def sampling_scheduler(self, steps, latent_shape):
        return token_shifted_scheduler(self.scheduler, steps, latent_shape)


class SDBackbone(Backbone):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, epsilon or v-prediction UNet."""

    family = "sd"
    prompt_tokens_settable = False  # CLIP's 77 tokens

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return Conditioning(embeds=embeds)

    def predict(self, latents, timesteps, cond, denoiser=None):
        net = denoiser or self.denoiser
        return net(latents, timesteps, encoder_hidden_states=cond.embeds, return_dict=False)[0]


class SDXLBackbone(Backbone):
    """SDXL: two CLIP text encoders, pooled text embeddings and size/crop micro-conditioning.

    Time ids are (original h, original w, crop top, crop left, target h, target w) with the
    image taken as uncropped at the latents' pixel size, as the Diffusion-DPO authors' train.py does
    (``[resolution, resolution, 0, 0, resolution, resolution]``). diffusers' SDXL DPO example passes
    the image's size before resizing and its crop corner instead.
    """

    family = "sdxl"
    prompt_tokens_settable = False  # CLIP's 77 tokens

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(prompts), device=self.device,
                                                       do_classifier_free_guidance=False)
        return Conditioning(embeds=embeds, pooled=pooled)

    def time_ids(self, latents: Tensor) -> Tensor:
        h, w = (s * self.vae_scale_factor for s in latents.shape[-2:])
        ids = torch.tensor([h, w, 0, 0, h, w], device=latents.device, dtype=latents.dtype)
        return ids.expand(latents.shape[0], 6)

    def predict(self, latents, timesteps, cond, denoiser=None):
        net = denoiser or self.denoiser
        added = {"text_embeds": cond.pooled, "time_ids": self.time_ids(latents)}
        return net(
            latents, timesteps, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False
        )[0]


class SD3Backbone(Backbone):
    """SD3 / SD3.5 MMDiT: two CLIPs and T5, flow matching, latents shifted then scaled."""

    family = "sd3"
    denoiser_attr = "transformer"
    latent_patch = None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        prompts = list(prompts)
        max_len = self.pipe.tokenizer_3.model_max_length if self.pipe.tokenizer_3 is not None else 77
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, prompts, prompts, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.prompt_length(max_len),
        )
        return Conditioning(embeds=embeds, pooled=pooled)

    def predict(self, latents, timesteps, cond, denoiser=None):
        net = denoiser or self.denoiser
        return net(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]


class FluxBackbone(TokenShiftedGrid, Backbone):
    """FLUX.1 (dev, schnell) MMDiT: CLIP-L pooled and T5 token embeddings, flow matching, 2x2-packed latents.

    The transformer sees each 2x2 patch of the (N, C, h, w) latents as one token of 4C channels
    (FluxPipeline's ``_pack_latents``) with (0, row, column) position ids for its rotary embedding, the
    text tokens with zero ids, and the timestep as sigma (FluxPipeline divides by 1000). FLUX.1-dev is
    guidance-distilled: it takes the guidance scale through an embedding instead of a second,
    unconditional pass, and is trained with a fixed value there (``distilled_guidance``, 3.5 as in
    diffusers' FLUX training scripts). FLUX.1-schnell has no such embedding.
    """

    family = "flux"
    denoiser_attr = "transformer"
    latent_patch = 2  # FluxPipeline's _pack_latents (its transformer's own patch_size is 1)

    def latent_shape(self, resolution: int, width: int | None = None) -> tuple[int, int, int]:
        shape = super().latent_shape(resolution, width)
        if shape[1] % 2 or shape[2] % 2:
            raise UserError(f"FLUX packs 2x2 latent patches, so the height and width must be multiples of "
                            f"{2 * self.vae_scale_factor}; got {resolution} x {width or resolution}")
        return shape

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        prompts = list(prompts)
        max_len = self.pipe.tokenizer_2.model_max_length
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompts, device=self.device,
                                                    max_sequence_length=self.prompt_length(max_len))
        return Conditioning(embeds=embeds, pooled=pooled)

    def predict(self, latents, timesteps, cond, denoiser=None):
        net = denoiser or self.denoiser
        n, c, h, w = latents.shape
        pipe = self.pipe
        tokens = pipe._pack_latents(latents, n, c, h, w)  # FluxPipeline's own packing, ids and unpacking
        image_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, latents.device, latents.dtype)
        if cond.reference is not None:  # Kontext: the source's tokens follow, their ids' first axis 1
            source = cond.reference[:, 0].to(latents.dtype)
            source_ids = pipe._prepare_latent_image_ids(n, source.shape[-2] // 2, source.shape[-1] // 2,
                                                        latents.device, latents.dtype)
            source_ids[..., 0] = 1
            tokens = torch.cat([tokens, pipe._pack_latents(source, n, c, *source.shape[-2:])], dim=1)
            image_ids = torch.cat([image_ids, source_ids])
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = self.guidance_embedding(n, latents.device)
        out = net(
            hidden_states=tokens,
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = self.vae_scale_factor
        return pipe._unpack_latents(out[:, : (h // 2) * (w // 2)], h * scale, w * scale, scale)


class FluxKontextBackbone(FluxBackbone):
    """FLUX.1 Kontext: FLUX.1-dev trained to edit, reading one source image's packed latents after the noisy ones
    (FluxKontextPipeline's ``prepare_latents``: the source's position ids have 1 on their first axis where the
    target's have 0), its prediction taken on the target's tokens only. Without a source it generates from text."""

    family = "flux-kontext"
    max_sources = 1


class ZImageBackbone(TokenShiftedGrid, Backbone):
    """Z-Image and Z-Image-Turbo: a single-stream DiT over the Qwen3 text encoder's second-to-last hidden states,
    flow matching on the FLUX VAE's latents.

    As ZImagePipeline calls it: the transformer takes a list of (C, 1, h, w) latents (it patches 2x2 itself) and a
    list of each prompt's unpadded token embeddings, its timestep runs the other way (1 - sigma: 0 is noise), and
    its output is minus the velocity diffusers' flow scheduler steps with. The prompts, chat-templated as the
    pipeline does, are kept padded to the batch's longest with their mask, and unpadded for the call.
    """

    family = "zimage"
    denoiser_attr = "transformer"
    latent_patch = 2  # the transformer's all_patch_size (2,)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds = self.pipe._encode_prompt(list(prompts), device=self.device,
                                          max_sequence_length=self.prompt_length())
        lengths = [e.shape[0] for e in embeds]
        padded = torch.stack([F.pad(e, (0, 0, 0, max(lengths) - e.shape[0])) for e in embeds])
        positions = torch.arange(max(lengths), device=padded.device)
        mask = positions[None] < torch.tensor(lengths, device=padded.device)[:, None]
        return Conditioning(embeds=padded, mask=mask)

    def predict(self, latents, timesteps, cond, denoiser=None):
        net = denoiser or self.denoiser
        dtype = self.denoiser.dtype  # net may be a DDP wrapper
        images = list(latents.to(dtype).unsqueeze(2).unbind(0))
        captions = [embeds[mask] for embeds, mask in zip(cond.embeds.to(dtype), cond.mask.bool())]
        out = net(images, (1000 - timesteps.float()) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2).to(latents.dtype)


def channel_stats(vae: nn.Module, like: Tensor) -> tuple[Tensor, Tensor]:
    """The (1, C, 1, 1, 1) per-channel mean and standard deviation a video VAE's latents are normalised by
    (``latents_mean``, ``latents_std``: Qwen-Image's and Wan's), on ``like``'s device and dtype."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


class QwenImageBackbone(TokenShiftedGrid, Backbone):
    """Qwen-Image: an MMDiT over the last hidden states of Qwen2.5-VL (its system prompt dropped, as the pipeline
    does), flow matching on the latents of its own causal video VAE (one frame), 2x2-packed into tokens.

    The VAE normalises each latent channel by the published mean and standard deviation (``latents_mean``,
    ``latents_std``) instead of one scaling factor; the adapter keeps the frame axis out of the objectives' way, so
    they see (N, C, h, w) latents. The transformer gets the packed tokens, each image's (frames, rows, columns) of
    patches, the timestep as sigma and the prompts' mask, as QwenImagePipeline calls it.
    """

    family = "qwenimage"
    denoiser_attr = "transformer"
    latent_patch = 2  # QwenImagePipeline's _pack_latents

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim


    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels in [-1, 1] (N, 3, H, W) -> normalised latents (N, C, H/f, W/f), the posterior mean unless a
        ``generator`` draws a sample (see :meth:`Backbone.encode_images`)."""
        vae = self.vae
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)[:, :, None]).latent_dist
        latents = dist.mean if generator is None else dist.sample(generator)
        mean, std = channel_stats(self.vae, latents)
        return ((latents - mean) / std)[:, :, 0]

    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.vae
        latents = latents.to(device=vae.device, dtype=vae.dtype)[:, :, None]
        mean, std = channel_stats(self.vae, latents)
        with sliced_decoding(vae):  # a round of 16 images at 512 px decoded at once holds 27 GiB more
            return vae.decode(latents * std + mean).sample[:, :, 0].clamp(-1, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, mask = self.pipe.encode_prompt(list(prompts), device=self.device,
                                               max_sequence_length=self.prompt_length())
        if mask is None:  # the pipeline drops an all-ones mask; the cache joins prompts of other lengths with it
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return Conditioning(embeds=embeds, mask=mask)

    def predict(self, latents, timesteps, cond, denoiser=None):
        net = denoiser or self.denoiser
        n, c, h, w = latents.shape
        pipe = self.pipe
        guidance = self.guidance_embedding(n, latents.device)
        tokens, shapes = [pipe._pack_latents(latents, n, c, h, w)], [(1, h // 2, w // 2)]
        if cond.reference is not None:  # the edit models: each source's packed tokens after the target's
            for source in cond.reference.to(latents.dtype).unbind(1):
                tokens.append(pipe._pack_latents(source, n, c, *source.shape[-2:]))
                shapes.append((1, source.shape[-2] // 2, source.shape[-1] // 2))
        out = net(
            hidden_states=torch.cat(tokens, dim=1),
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=guidance,
            encoder_hidden_states_mask=cond.mask,
            encoder_hidden_states=cond.embeds,
            img_shapes=[shapes] * n,
            return_dict=False,
        )[0]
        scale = self.vae_scale_factor
        return pipe._unpack_latents(out[:, : tokens[0].shape[1]], h * scale, w * scale, scale)[:, :, 0]

    @classmethod
    def pipeline_guidance(cls, scale, n):
        """The Qwen-Image pipelines guide with ``true_cfg_scale`` against a negative prompt (their
        ``guidance_scale`` is only a guidance-distilled model's embedding): the empty one, as training uses."""
        return {"true_cfg_scale": scale, "negative_prompt": [""] * n}

    def combine_guidance(self, unconditional, conditional, scale):
        """The Qwen-Image pipelines' true CFG: u + s (c - u), rescaled token by token (each 2x2 patch's 4C values)
        to the norm of the conditional prediction."""
        guided = super().combine_guidance(unconditional, conditional, scale)
        n, c, h, w = guided.shape

        def token_norm(x: Tensor) -> Tensor:
            return torch.linalg.vector_norm(x.reshape(n, c, h // 2, 2, w // 2, 2), dim=(1, 3, 5), keepdim=True)

        rescaled = guided.reshape(n, c, h // 2, 2, w // 2, 2) * (token_norm(conditional) / token_norm(guided))
        return rescaled.reshape(n, c, h, w)


class QwenImageEditBackbone(QwenImageBackbone):
    """Qwen-Image-Edit: Qwen-Image reading one source image twice, as QwenImageEditPipeline does: its latents'
    packed tokens after the noisy ones (``Conditioning.reference``), and the image itself through Qwen2.5-VL with
    the instruction, resized to the pipeline's 1024x1024-pixel area first. So the prompts' embeddings depend on
    their sources (:attr:`Backbone.prompt_reads_sources`): they are encoded one prompt at a time with its own
    images, and the unconditional branch's empty prompt too (``negative_embeds``)."""

    family = "qwenimage-edit"
    max_sources = min_sources = 1
    prompt_reads_sources = True
    empty_prompt_reads_sources = True

    def _condition_size(self, ratio: float) -> tuple[int, int]:
        """(width, height) the pipeline resizes a source of aspect ``ratio`` to for its text encoder."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

        width, height, _ = pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, ratio)
        return width, height

    def _condition_image(self, source: Tensor):
        """One source, pixels in [-1, 1] (3, H, W), as the image the pipeline gives its text encoder."""
        from diffalign.diffusion.sampling import to_pil  # sampling imports this module

        image = to_pil(source.add(1).div(2))
        width, height = self._condition_size(image.width / image.height)
        return self.pipe.image_processor.resize(image, height, width)

    def _prompt_images(self, sources: Tensor):
        """What the pipeline's ``encode_prompt`` takes for one prompt's sources (S, 3, H, W): one image."""
        return self._condition_image(sources[0])

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], sources: Tensor | None = None) -> Conditioning:
        """Each prompt with its sources: (N, S, 3, H, W) pixels in [-1, 1]."""
        if sources is None:
            raise ValueError(f"{type(self.pipe).__name__} encodes each prompt with its source images")
        encoded = []
        for prompt, images in zip(prompts, sources):
            embeds, mask = self.pipe.encode_prompt([prompt], image=self._prompt_images(images), device=self.device,
                                                   max_sequence_length=self.prompt_length())
            if mask is None:
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            encoded.append(Conditioning(embeds=embeds, mask=mask))
        return Conditioning.cat(encoded)


class QwenImageEditPlusBackbone(QwenImageEditBackbone):
    """Qwen-Image-Edit-2509 and 2511 (QwenImageEditPlusPipeline): several source images, each given to Qwen2.5-VL
    as "Picture i" resized to the pipeline's 384x384-pixel area (``CONDITION_IMAGE_SIZE``), and each one's latents
    after the noisy ones. Its model card advises one to three sources."""

    family = "qwenimage-edit-plus"
    max_sources = 3

    def _condition_size(self, ratio):
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

        return plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, ratio)

    def _prompt_images(self, sources):
        return [self._condition_image(source) for source in sources]


class Flux2Backbone(Backbone):
    """FLUX.2 klein: an MMDiT over three stacked hidden layers of Qwen3 (9, 18, 27, as Flux2KleinPipeline takes them),
    flow matching on the FLUX.2 VAE's latents.

    The transformer works on the VAE's latents patchified 2x2 into 4C channels and normalised by the VAE's own
    batch-norm statistics (``vae.bn``); those are the latents the objectives see here, (N, 4C, h/2, w/2), so a
    latent pixel is 16 image pixels. Tokens are those pixels in order, with (t, row, column, layer) position ids,
    the text tokens with (0, 0, 0, index); the timestep is sigma. Its sampling grid shifts by an empirical ``mu`` of
    the token count and the step count (``compute_empirical_mu``).
    """

    family = "flux2"
    denoiser_attr = "transformer"
    latent_patch = 2  # the VAE's latents patchified 2x2 (the transformer's own patch_size is 1)
    max_sources = 10  # Flux2KleinPipeline's image list: reference images to edit or to take subjects from

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.config.block_out_channels)  # the VAE's factor times the 2x2 patchify

    @property
    def latent_channels(self) -> int:
        return 4 * self.vae.config.latent_channels

    def _batch_norm(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(latents.device,
                                                                                              latents.dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        vae = self.vae
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = self.pipe._patchify_latents(dist.mean if generator is None else dist.sample(generator))
        mean, std = self._batch_norm(latents)
        return (latents - mean) / std

    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self.vae
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        mean, std = self._batch_norm(latents)
        with sliced_decoding(vae):
            return vae.decode(self.pipe._unpatchify_latents(latents * std + mean)).sample.clamp(-1, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=self.device,
                                            max_sequence_length=self.prompt_length())
        return Conditioning(embeds=embeds)

    def sampling_scheduler(self, steps, latent_shape):
        """Flux2KleinPipeline's grid: sigmas linspace(1, 1/steps) shifted by its empirical ``mu``."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        mu = compute_empirical_mu(image_seq_len=latent_shape[-2] * latent_shape[-1], num_steps=steps)
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
        return scheduler

    def predict(self, latents, timesteps, cond, denoiser=None):
        net = denoiser or self.denoiser
        n, c, h, w = latents.shape
        pipe = self.pipe
        guidance = self.guidance_embedding(n, latents.device)
        tokens, image_ids = pipe._pack_latents(latents), pipe._prepare_latent_ids(latents).to(latents.device)
        if cond.reference is not None:  # reference images: their tokens follow, at times 10, 20, ... (_prepare_image_ids)
            sources = cond.reference.to(latents.dtype)
            tokens = torch.cat([tokens, *(pipe._pack_latents(sources[:, s]) for s in range(sources.shape[1]))], dim=1)
            source_ids = pipe._prepare_image_ids([sources[:1, s] for s in range(sources.shape[1])])
            image_ids = torch.cat([image_ids, source_ids.to(image_ids).expand(n, -1, -1)], dim=1)
        out = net(
            hidden_states=tokens,
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=guidance,
            encoder_hidden_states=cond.embeds,
            txt_ids=pipe._prepare_text_ids(cond.embeds).to(latents.device),
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return out[:, : h * w].permute(0, 2, 1).reshape(n, c, h, w)  # the target's tokens back in row-major order


class PixArtBackbone(Backbone):
    """PixArt-alpha / sigma DiT: T5 text encoder with attention mask, learned-sigma output."""

    family = "pixart"
    denoiser_attr = "transformer"
    latent_patch = None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        max_len = self.pipe.tokenizer.model_max_length
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.prompt_length(max_len)
        )
        return Conditioning(embeds=embeds, mask=mask)

    def predict(self, latents, timesteps, cond, denoiser=None):
        net = denoiser or self.denoiser
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(self.denoiser.config, "use_additional_conditions", False):  # net may be a DDP wrapper
            h, w = (s * self.vae_scale_factor for s in latents.shape[-2:])
            n = latents.shape[0]
            added = {
                "resolution": torch.tensor([[h, w]], device=latents.device, dtype=latents.dtype).expand(n, 2),
                "aspect_ratio": torch.tensor([[h / w]], device=latents.device, dtype=latents.dtype).expand(n, 1),
            }
        out = net(
            latents,
            encoder_hidden_states=cond.embeds,
            encoder_attention_mask=cond.mask,
            timestep=timesteps,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * latents.shape[1]:  # learned variance: keep the mean prediction
            out = out.chunk(2, dim=1)[0]
        return out


class VideoBackbone(Backbone):
    """What the video adapters share: clips of :attr:`frames` frames (4k + 1 for a VAE 4x in time; 0 for images,
    one-frame clips), their latent shape, and decoded clips given back as images on a run of images."""

    latent_patch = None  # the transformer's own (frames, rows, columns) patch
    video = True

    @property
    def temporal_factor(self) -> int:
        """How many frames the VAE folds into one latent frame (after the first)."""
        raise NotImplementedError

    def __init__(self, pipe, *, distilled_guidance: float = 3.5, frames: int = 0, expert: str | None = None,
                 prompt_tokens: int | None = None) -> None:
        super().__init__(pipe, distilled_guidance=distilled_guidance, frames=frames, expert=expert,
                         prompt_tokens=prompt_tokens)
        step = self.temporal_factor
        if frames and (frames - 1) % step:
            raise UserError(f"data.frames={frames}: {type(pipe).__name__}'s VAE reads clips of {step}k + 1 frames "
                            f"(e.g. {(frames - 1) // step * step + 1} or {((frames - 1) // step + 1) * step + 1})")

    def latent_shape(self, resolution: int, width: int | None = None) -> tuple[int, ...]:
        """(C, F, h, w) of a clip of :attr:`frames` frames (one for images), ``resolution`` pixels high and ``width``
        wide (None: square)."""
        _, h, w = super().latent_shape(resolution, width)
        return (self.latent_channels, (max(self.frames, 1) - 1) // self.temporal_factor + 1, h, w)

    def clips_or_images(self, clips: Tensor) -> Tensor:
        """Decoded clips (N, 3, F, H, W), or their one frame (N, 3, H, W) on a run of images (:attr:`frames` 0), so
        image rewards read them as they read any model's."""
        return clips if self.frames else clips[:, :, 0]


class WanBackbone(VideoBackbone):
    """Wan2.1 text-to-video: a 3D DiT over UMT5 embeddings (zero-padded to the pipeline's 512 tokens), flow matching
    on the latents of Wan's causal video VAE (4x in time, 8x in space), normalised per channel as WanPipeline
    un-normalises them before decoding (``latents_mean``, ``latents_std``).

    A clip of ``frames`` frames has (frames - 1) / 4 + 1 latent frames; Wan's VAE needs ``frames`` = 4k + 1. Images
    (``frames`` 0) are one-frame clips, as Wan itself trains on images. The pipelines sample with UniPC on shifted flow
    sigmas (``flow_shift``); training noises on the same shifted grid through a flow-matching scheduler built from
    those settings, and the online methods step on UniPC's own sampling grid.
    """

    family = "wan"
    denoiser_attr = "transformer"

    EXPERTS = ExpertPair.ATTRS  # each expert's pipeline component

    def __init__(self, pipe, *, distilled_guidance: float = 3.5, frames: int = 0, expert: str | None = None,
                 prompt_tokens: int | None = None) -> None:
        super().__init__(pipe, distilled_guidance=distilled_guidance, frames=frames, expert=expert,
                         prompt_tokens=prompt_tokens)
        self._pair = None
        self.expert = expert
        if self.two_experts(pipe):
            if expert not in (*self.EXPERTS, "both"):
                raise UserError(f"{type(pipe).__name__} here has two experts, switched at timestep "
                                f"{pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps:g}: set "
                                "model.expert=high (transformer, the noisier steps), model.expert=low "
                                "(transformer_2), or model.expert=both (each its own LoRA, in one run)")
            if expert == "both":
                self._pair = ExpertPair(pipe.transformer, pipe.transformer_2, self.boundary)
            else:
                self.denoiser_attr = self.EXPERTS[expert]
        self._training_scheduler = self._flow_training_scheduler(pipe.scheduler)

    @property
    def denoiser(self) -> nn.Module:
        """The trained denoiser: one expert, or both as one module (:class:`ExpertPair`, ``model.expert=both``)."""
        return self._pair if self._pair is not None else super().denoiser

    def frozen_components(self) -> dict[str, nn.Module]:
        return {name: module for name, module in super().frozen_components().items()
                if self._pair is None or name not in self.EXPERTS.values()}

    @staticmethod
    def _flow_training_scheduler(scheduler):
        """A flow-matching scheduler on the pipeline's shifted sigmas: the pipeline's own if it is one, else (UniPC
        with ``use_flow_sigmas``, as Wan ships) FlowMatchEulerDiscreteScheduler with its ``flow_shift``."""
        if "FlowMatch" in type(scheduler).__name__:
            return scheduler
        config = scheduler.config
        if not config.get("use_flow_sigmas") or config.get("prediction_type") != "flow_prediction":
            raise UserError(f"{type(scheduler).__name__} here samples no flow-matching model (use_flow_sigmas, "
                            "prediction_type=flow_prediction); Wan's pipelines ship it so configured")
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps,
                                               shift=config.get("flow_shift", 1.0))

    @property
    def scheduler(self):
        return self._training_scheduler

    @property
    def boundary(self) -> float | None:
        """The timestep (sigma x 1000) at and above which a two-expert model's ``transformer`` denoises; None for
        one denoiser."""
        if self.expert is None:
            return None
        return self.pipe.config.boundary_ratio * self.pipe.scheduler.config.num_train_timesteps

    def timestep_share(self) -> tuple[float, float]:
        """The trained expert's share of the training schedule: its timesteps (sigma x 1000 of the shifted grid,
        increasing with the index) at or above the boundary for the high-noise expert, below it for the other; all
        of it for both."""
        if self.expert in (None, "both"):
            return (0.0, 1.0)
        timesteps = self.scheduler.timesteps.flip(0).float()
        first_high = int(torch.searchsorted(timesteps, torch.tensor(self.boundary)))
        split = first_high / len(timesteps)
        return (split, 1.0) if self.expert == "high" else (0.0, split)

    def companion_denoisers(self) -> list[nn.Module]:
        """The other expert of a two-expert model that trains one: it denoises the steps the trained one does not."""
        if self.expert in (None, "both"):
            return []
        return [getattr(self.pipe, self.EXPERTS["low" if self.expert == "high" else "high"])]

    def serves(self, timesteps: Tensor) -> Tensor:
        if self.expert in (None, "both"):
            return super().serves(timesteps)
        high = timesteps >= self.boundary
        return high if self.expert == "high" else ~high

    @property
    def lora_file_attr(self) -> str:
        """``transformer``: diffusers saves and loads a Wan2.2 low-noise expert's LoRA as a ``transformer`` LoRA
        (``load_lora_weights(..., load_into_transformer_2=True)``)."""
        return "transformer"

    def sampling_scheduler(self, steps, latent_shape):
        """The pipeline's own sampler set to ``steps`` steps: its sigmas (ending at 0) and timesteps are the grid
        WanPipeline samples on."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.scale_factor_spatial

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.scale_factor_temporal


    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Clips (N, 3, F, H, W), or images (N, 3, H, W) as one-frame clips, in [-1, 1] -> normalised latents
        (N, C, F', H/f, W/f); the posterior mean unless a ``generator`` draws a sample."""
        vae = self.vae
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        dist = vae.encode(pixels if pixels.dim() == 5 else pixels[:, :, None]).latent_dist
        latents = dist.mean if generator is None else dist.sample(generator)
        mean, std = channel_stats(self.vae, latents)
        return (latents - mean) / std

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents (N, C, F', h, w) -> clips (N, 3, F, H, W) in [-1, 1], one clip per VAE call; images
        (N, 3, H, W) for a run on images (:attr:`frames` 0), so image rewards read them as they read any model's."""
        vae = self.vae
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        mean, std = channel_stats(self.vae, latents)
        return self.clips_or_images(torch.cat([vae.decode(clip[None] * std + mean).sample
                                               for clip in latents]).clamp(-1, 1))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                            max_sequence_length=self.prompt_length(),
                                            device=self.device)
        return Conditioning(embeds=embeds)

    def predict(self, latents, timesteps, cond, denoiser=None):
        """The transformer on (N, C, F, h, w) latents at ``timesteps`` (sigma x 1000), as WanPipeline calls it; a
        pipeline that ``expand_timesteps`` (Wan2.2 TI2V) gives every latent token its item's timestep. A two-expert
        model's items are each denoised by the expert the pipeline switches to at their timestep: the trained one
        (``denoiser``, else :attr:`denoiser`) on its own share, the other, frozen, on the rest."""
        net = denoiser or self.denoiser
        if self.expert not in (None, "both"):  # both experts: the pair sends each item to its own
            mine = self.serves(timesteps)
            if not bool(mine.all()):
                other = self.companion_denoisers()[0]
                parts = []
                for chosen, module in ((mine, net), (~mine, other)):
                    rows = chosen.nonzero().squeeze(1)  # indices, not a mask: shapes a fake tensor can follow
                    if len(rows):
                        on = rows.to(latents.device)
                        parts.append((rows, self._call(module, latents.index_select(0, on), timesteps[rows],
                                                       cond[on])))
                order = torch.cat([rows for rows, _ in parts]).argsort()
                return torch.cat([out for _, out in parts]).index_select(0, order.to(latents.device))
        return self._call(net, latents, timesteps, cond)

    def _call(self, net, latents, timesteps, cond):
        return net(hidden_states=self._hidden_states(latents, cond), timestep=self._timestep(latents, timesteps, cond),
                   encoder_hidden_states=cond.embeds, return_dict=False, **self._image_inputs(cond))[0]

    def _timestep(self, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        """(N,) timesteps as the transformer reads them: one per item, or (N, tokens) one per latent token where
        the pipeline ``expand_timesteps`` (Wan2.2 TI2V)."""
        timestep = timesteps.to(latents.device)
        if getattr(self.pipe.config, "expand_timesteps", False):
            patch = self.pipe.transformer.config.patch_size  # the denoiser called may be a DDP wrapper
            f, h, w = latents.shape[2:]
            timestep = timestep[:, None].expand(len(latents), (f // patch[0]) * (h // patch[1]) * (w // patch[2]))
        return timestep

    def _hidden_states(self, latents: Tensor, cond: Conditioning) -> Tensor:
        """What the transformer reads as its latent input: the noisy latents (text to video)."""
        return latents

    def _image_inputs(self, cond: Conditioning) -> dict:
        """The transformer's image-token arguments: none for text to video."""
        return {}


class FirstFrameSource:
    """For the image-to-video adapters: the first frame is an edit's one source (``data.source_columns``; online, each
    prompt's row), and what the denoiser reads of it (:meth:`Backbone.encode_sources`) depends on the clip length, so
    the latent cache keeps it per ``data.frames``."""

    max_sources = min_sources = 1
    source_role = "starts each clip from a first-frame image"

    @property
    def source_cache_kind(self) -> str:
        return f"{self.family}-condition@{max(self.frames, 1)}frames"

    def first_frame_condition(self, cond: Conditioning, dtype: torch.dtype) -> Tensor:
        """Each item's first-frame condition (``Conditioning.reference``'s one source), in ``dtype``."""
        if cond.reference is None:
            raise ValueError(f"{type(self.pipe).__name__} predicts from a first frame: its condition is "
                             "Conditioning.reference")
        return cond.reference[:, 0].to(dtype)

    @staticmethod
    def first_frames(sources: Tensor) -> list:
        """Each prompt's first frame, ``sources`` (N, 1, 3, H, W) in [-1, 1], as the PIL image its pipeline's
        ``encode_image`` reads."""
        from diffalign.diffusion.sampling import to_pil  # sampling imports this module

        return [to_pil(images[0].float().add(1).div(2)) for images in sources]


class WanTI2VBackbone(FirstFrameSource, WanBackbone):
    """Wan2.2 TI2V-5B (WanPipeline with ``expand_timesteps``): text to video, and from a first frame (an edit's one
    source, ``data.source_columns``; online, each prompt's row) image to video, as WanImageToVideoPipeline runs the
    same weights with ``expand_timesteps``: the frame's latents (the causal VAE's one latent frame of it, normalised
    as latents are) replace the first latent frame of the transformer's input, and that frame's tokens read timestep
    0 while the others read the step's.

    The pipeline discards the transformer's output on the first frame and puts the condition back after its last
    step. Here that output is replaced, before any loss or sampler step reads it, by (x_t - c) / sigma, the velocity
    that takes the noisy first frame x_t to the condition c (flow matching: x_t = (1 - sigma) x_0 + sigma eps, velocity
    eps - x_0). It is computed without the network, so it is the same for the policy, the reference and the sampler:

    - no gradient flows through the first frame, and an item whose first frame is the condition has no error there:
      the first frame's loss is masked out, as the model's own training masks it (the error's mean over elements
      still counts them, a constant factor (F' - 1) / F' on the loss of F' latent frames);
    - a sampler step's mean there is the same under every model, so log-probability ratios read the other frames
      only; the deterministic steps land near c (up to the sampler's integer timesteps: UniPC's t is 1000 sigma
      rounded down, so sigma here is off by up to 1e-3), and the rounds decode their clips with c put back
      (:meth:`finish_sample`), as the pipeline does after its last step, noisy steps or not.

    Without a first frame it is WanBackbone's text to video. ``diffalign eval --sources`` samples through
    WanImageToVideoPipeline built from the same components (:meth:`pipeline_with_sources`)."""

    min_sources = 0  # text to video without one
    source_role = "starts each clip from a first-frame image, or from text alone"

    @property
    def source_cache_kind(self) -> str:
        """The frame's own latents, whatever the clip length: an image's cache entry serves."""
        return "latent"

    def source_shape(self, latent_shape):
        return (latent_shape[0], 1, *latent_shape[2:])

    @torch.no_grad()
    def encode_sources(self, pixels: Tensor) -> Tensor:
        """First frames (N, 3, H, W) in [-1, 1] -> their normalised latents (N, C, 1, h, w), the VAE's mode, as the
        pipeline's ``prepare_latents`` encodes ``image`` (``sample_mode="argmax"``)."""
        return self.encode_images(pixels)

    def _condition_first(self, latents: Tensor, cond: Conditioning) -> Tensor:
        """``latents`` with their first frame replaced by the condition when there is one."""
        if cond.reference is None:
            return latents
        first = self.first_frame_condition(cond, latents.dtype).to(latents.device)
        return torch.cat([first, latents[:, :, 1:]], dim=2)

    def _hidden_states(self, latents, cond):
        """The noisy latents, their first frame the condition (:meth:`_condition_first`)."""
        return self._condition_first(latents, cond)

    def _call(self, net, latents, timesteps, cond):
        out = super()._call(net, latents, timesteps, cond)
        if cond.reference is None:
            return out
        sigma = (timesteps.to(latents.device).float() / self.pipe.scheduler.config.num_train_timesteps).clamp_min(1e-4)
        first = (latents[:, :, :1].float() - self.first_frame_condition(cond, torch.float32)) / sigma.view(-1, 1, 1, 1, 1)
        return torch.cat([first.to(out.dtype), out[:, :, 1:]], dim=2)

    def _timestep(self, latents, timesteps, cond):
        """Every token the step's timestep, the first frame's 0 when it is the condition (the pipeline's
        ``first_frame_mask * t``)."""
        timestep = super()._timestep(latents, timesteps, cond)
        if cond.reference is None:
            return timestep
        patch = self.pipe.transformer.config.patch_size
        first = (latents.shape[3] // patch[1]) * (latents.shape[4] // patch[2])  # the first latent frame's tokens
        return torch.cat([torch.zeros_like(timestep[:, :first]), timestep[:, first:]], dim=1)

    def finish_sample(self, latents, cond):
        """The first frame put back to the condition (the pipeline's last line before decoding)."""
        return self._condition_first(latents, cond)

    @staticmethod
    def pipeline_with_sources(pipe):
        """WanImageToVideoPipeline with ``expand_timesteps`` on ``pipe``'s components: the same model's image mode."""
        from diffusers import WanImageToVideoPipeline

        return WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                       scheduler=pipe.scheduler, transformer=pipe.transformer, expand_timesteps=True)


class WanI2VBackbone(FirstFrameSource, WanBackbone):
    """Wan2.1 I2V and Wan2.2 I2V A14B (WanImageToVideoPipeline): Wan's text-to-video transformer reading a first frame
    beside the noisy latents, as the pipeline feeds it (``prepare_latents``): the frame followed by black frames,
    through the VAE and normalised as latents are, after a mask of the clip's first pixel frame (4 channels, one per
    frame a latent frame folds: ones on the first latent frame, zeros after), concatenated on the channels; Wan2.1's
    transformer also reads the frame's CLIP tokens (the image encoder's second-to-last hidden states) before the
    text's, in every block's added key/value projections, and both guidance branches see them.

    The first frame is the edit's one source (``data.source_columns``; online, each prompt's row). Its condition
    depends on the clip length, so the latent cache keys it by the frames; Wan2.1's image tokens join the prompt's
    conditioning (:attr:`prompt_reads_sources`). The image tokens are split from the text's at 512 text tokens in
    diffusers' attention processor, so Wan2.1 I2V reads its prompts at 512 tokens. Wan2.2 TI2V-5B's image mode (a
    first latent frame held clean at timestep 0) is :class:`WanTI2VBackbone`."""

    family = "wan-i2v"

    def __init__(self, pipe, *, distilled_guidance: float = 3.5, frames: int = 0, expert: str | None = None,
                 prompt_tokens: int | None = None) -> None:
        if getattr(pipe, "image_encoder", None) is not None and prompt_tokens not in (None, 512):
            raise UserError(f"model.prompt_tokens={prompt_tokens}: Wan2.1 I2V's attention splits its CLIP image "
                            "tokens from the text at 512 text tokens (diffusers' WanAttnProcessor); leave "
                            "model.prompt_tokens unset")
        super().__init__(pipe, distilled_guidance=distilled_guidance, frames=frames, expert=expert,
                         prompt_tokens=prompt_tokens)

    @property
    def prompt_reads_sources(self) -> bool:
        """Wan2.1 I2V's conditioning holds the first frame's CLIP tokens; Wan2.2's reads the frame only as latents."""
        return getattr(self.pipe, "image_encoder", None) is not None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], sources: Tensor | None = None) -> Conditioning:
        """The prompts' UMT5 embeddings; for Wan2.1 I2V with each one's first frame's CLIP tokens, the frames given as
        ``sources`` (N, 1, 3, H, W) pixels in [-1, 1] and read as the pipeline's ``encode_image`` reads an image
        (without ``sources``, the text alone: the guidance's empty prompt, which takes each item's tokens)."""
        cond = super().encode_prompts(prompts)
        if sources is None or not self.prompt_reads_sources:  # the text alone: guidance's empty prompt
            return cond
        return replace(cond, image_embeds=self.pipe.encode_image(self.first_frames(sources), self.device))

    @torch.no_grad()
    def encode_sources(self, pixels: Tensor) -> Tensor:
        """First frames (N, 3, H, W) in [-1, 1] -> their conditions (N, T + C, F', h, w): the mask of T channels
        (the VAE's temporal factor), then the latents of the frame followed by ``frames`` - 1 black ones."""
        n, _, height, width = pixels.shape
        clip = torch.cat([pixels[:, :, None], pixels.new_zeros(n, 3, max(self.frames, 1) - 1, height, width)], dim=2)
        latents = self.encode_images(clip)
        mask = latents.new_zeros(n, self.temporal_factor, *latents.shape[2:])
        mask[:, :, 0] = 1
        return torch.cat([mask, latents], dim=1)

    def source_shape(self, latent_shape):
        return (self.temporal_factor + latent_shape[0], *latent_shape[1:])

    def _hidden_states(self, latents, cond):
        """The noisy latents, then the first frame's condition (``Conditioning.reference``)."""
        return torch.cat([latents, self.first_frame_condition(cond, latents.dtype)], dim=1)

    def _image_inputs(self, cond):
        return {} if cond.image_embeds is None else {"encoder_hidden_states_image": cond.image_embeds}


class HunyuanVideo15Backbone(VideoBackbone):
    """HunyuanVideo 1.5 text-to-video: a 3D DiT over two text streams, the third-last hidden states of Qwen2.5-VL's
    text model and ByT5's embeddings of any quoted text to render, each with its mask; flow matching on the latents of
    its 32-channel video VAE (16x in space, 4x in time) scaled by one factor. Its transformer reads an image
    condition beside the noisy latents, the condition's latents, a mask channel and SigLIP image embeddings, which text
    to video fills with zeros, as the pipeline does. The pipeline guides through its ``guider`` (classifier-free
    guidance, u + s (c - u)) and samples on the sigmas 1, (n - 1) / n, ..., 1 / n, shifted."""

    family = "hunyuanvideo15"
    prompt_tokens_settable = False  # its encode_prompt sets its own lengths
    denoiser_attr = "transformer"

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.temporal_compression_ratio

    def sampling_scheduler(self, steps, latent_shape):
        """The pipeline's grid: sigmas 1, (n - 1) / n, ..., 1 / n through the scheduler's shift, then 0."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist())
        return scheduler

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.spatial_compression_ratio

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Clips (N, 3, F, H, W), or images as one-frame clips, in [-1, 1] -> latents times the VAE's scaling factor
        (the pipeline divides by it before decoding); the posterior mean unless a ``generator`` draws a sample. One
        clip per VAE call: the encoder's causal attention builds a (N, L, L) mask that SDPA broadcasts over its one
        head as N heads (diffusers 0.42), so a batch of more than one clip fails there."""
        vae = self.vae
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        clips = pixels if pixels.dim() == 5 else pixels[:, :, None]
        dists = [vae.encode(clip[None]).latent_dist for clip in clips]
        latents = torch.cat([d.mean if generator is None else d.sample(generator) for d in dists])
        return latents * vae.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents (N, C, F', h, w) -> clips (N, 3, F, H, W) in [-1, 1], one clip per VAE call; images for a run on
        images (:attr:`frames` 0)."""
        vae = self.vae
        latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        return self.clips_or_images(torch.cat([vae.decode(clip[None]).sample for clip in latents]).clamp(-1, 1))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, mask, embeds_2, mask_2 = self.pipe.encode_prompt(list(prompts), device=self.device,
                                                                 batch_size=len(prompts))
        return Conditioning(embeds=embeds, mask=mask.long(), embeds_2=embeds_2, mask_2=mask_2.long())

    def predict(self, latents, timesteps, cond, denoiser=None):
        """The transformer as HunyuanVideo15Pipeline calls it for text to video: the noisy latents beside a zero
        image condition and mask channel, zero image embeddings, the timestep (sigma x 1000) and both text streams."""
        net = denoiser or self.denoiser
        inputs = torch.cat([latents, self._image_condition(latents, cond)], dim=1)
        return net(hidden_states=inputs, image_embeds=self._image_tokens(latents, cond),
                   timestep=timesteps.to(latents.dtype), encoder_hidden_states=cond.embeds,
                   encoder_attention_mask=cond.mask, encoder_hidden_states_2=cond.embeds_2,
                   encoder_attention_mask_2=cond.mask_2, return_dict=False)[0]

    def _image_condition(self, latents: Tensor, cond: Conditioning) -> Tensor:
        """The image condition's latents and mask channel beside the noisy latents: zeros for text to video."""
        n, _, f, h, w = latents.shape
        return torch.cat([torch.zeros_like(latents), latents.new_zeros(n, 1, f, h, w)], dim=1)

    def _image_tokens(self, latents: Tensor, cond: Conditioning) -> Tensor:
        """The SigLIP image tokens: zeros for text to video (the transformer then masks them out)."""
        config = self.pipe.transformer.config  # the denoiser may be a DDP wrapper
        return latents.new_zeros(len(latents), self.pipe.vision_num_semantic_tokens, config.image_embed_dim)

    @classmethod
    def pipeline_guidance(cls, scale, n):
        """None as call arguments: HunyuanVideo15Pipeline guides through its guider (:meth:`prepare_pipeline`)."""
        return {}

    @classmethod
    def prepare_pipeline(cls, pipe, guidance_scale: float) -> None:
        """Its guider at ``guidance_scale`` (classifier-free guidance; 1 turns the unconditional pass off)."""
        pipe.guider = pipe.guider.new(guidance_scale=guidance_scale)


class HunyuanVideo15I2VBackbone(FirstFrameSource, HunyuanVideo15Backbone):
    """HunyuanVideo 1.5 image to video (HunyuanVideo15ImageToVideoPipeline): the first frame's latents (encoded alone,
    scaled) on the first latent frame and zeros after, then a mask channel of ones on that frame, beside the noisy
    latents; and the frame's SigLIP tokens (the image encoder's last hidden states) as the transformer's image tokens,
    in both guidance branches. The first frame is the edit's one source (``data.source_columns``); its tokens join
    the prompt's conditioning (:attr:`prompt_reads_sources`) and its condition is cached per clip length.

    The pipeline picks its own size, the bucket of about ``target_size`` squared pixels nearest the frame's aspect
    (``calculate_default_height_width``), so train at that size (480p: 848 x 480 for 16:9) for samples of the size
    trained."""

    family = "hunyuanvideo15-i2v"
    prompt_reads_sources = True

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], sources: Tensor | None = None) -> Conditioning:
        """Both text streams, and each prompt's first frame's SigLIP tokens: ``sources`` (N, 1, 3, H, W) in [-1, 1],
        read as the pipeline's ``encode_image`` reads an image."""
        cond = super().encode_prompts(prompts)
        if sources is None:  # the text alone: guidance's empty prompt, which takes each item's tokens
            return cond
        tokens = torch.cat([self.pipe.encode_image(image=frame, batch_size=1, device=self.device,
                                                   dtype=cond.embeds.dtype) for frame in self.first_frames(sources)])
        return replace(cond, image_embeds=tokens)

    @torch.no_grad()
    def encode_sources(self, pixels: Tensor) -> Tensor:
        """First frames (N, 3, H, W) in [-1, 1] -> (N, C + 1, F', h, w): their latents on the first latent frame,
        zeros after, then the mask channel."""
        first = self.encode_images(pixels)  # (N, C, 1, h, w): each frame a one-frame clip
        frames = (max(self.frames, 1) - 1) // self.temporal_factor + 1
        condition = torch.cat([first, first.new_zeros(*first.shape[:2], frames - 1, *first.shape[3:])], dim=2)
        mask = torch.zeros_like(condition[:, :1])
        mask[:, :, 0] = 1
        return torch.cat([condition, mask], dim=1)

    def source_shape(self, latent_shape):
        return (latent_shape[0] + 1, *latent_shape[1:])

    @classmethod
    def pipeline_size(cls, pipe, height, width):
        """None as call arguments: the pipeline samples at the size bucket nearest its first frame's aspect, so a size
        asked for must be that bucket (the first frames given at that size)."""
        bucket = tuple(pipe.video_processor.calculate_default_height_width(height=height, width=width,
                                                                          target_size=pipe.target_size))
        if bucket != (height, width):
            raise UserError(f"{type(pipe).__name__} samples at the size bucket nearest its first frame's aspect, "
                            f"{bucket[1]} x {bucket[0]} px for a frame of {width} x {height}: sample (and train) at "
                            "that size")
        return {}

    def _image_condition(self, latents, cond):
        return self.first_frame_condition(cond, latents.dtype)

    def _image_tokens(self, latents, cond):
        return cond.image_embeds.to(latents.dtype)


BACKBONES: dict[str, type[Backbone]] = {
    "StableDiffusionPipeline": SDBackbone,
    "StableDiffusionXLPipeline": SDXLBackbone,
    "StableDiffusion3Pipeline": SD3Backbone,
    "FluxPipeline": FluxBackbone,
    "FluxKontextPipeline": FluxKontextBackbone,
    "ZImagePipeline": ZImageBackbone,
    "QwenImagePipeline": QwenImageBackbone,
    "QwenImageEditPipeline": QwenImageEditBackbone,
    "QwenImageEditPlusPipeline": QwenImageEditPlusBackbone,
    "Flux2KleinPipeline": Flux2Backbone,
    "Flux2Pipeline": Flux2Backbone,
    "PixArtAlphaPipeline": PixArtBackbone,
    "PixArtSigmaPipeline": PixArtBackbone,
    "WanPipeline": WanBackbone,
    "WanImageToVideoPipeline": WanI2VBackbone,
    "HunyuanVideo15Pipeline": HunyuanVideo15Backbone,
    "HunyuanVideo15ImageToVideoPipeline": HunyuanVideo15I2VBackbone,
}
VIDEO_PIPELINES = [name for name, backbone in BACKBONES.items() if backbone.video]


def pixel_multiple(folder: Path) -> int | None:
    """What a training resolution must be a multiple of for the pipeline in ``folder``: the VAE's downsampling
    factor times the denoiser's latent patch, read from the folder's configs without loading a weight; None when
    the folder is no pipeline diffalign trains (the loader says why, later)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        backbone = BACKBONES[index["_class_name"]]
        patch = backbone.latent_patch
        if patch is None:
            patch = json.loads((folder / backbone.denoiser_attr / "config.json").read_text()).get("patch_size", 1)
            patch = patch[-1] if isinstance(patch, list) else patch  # a video transformer's (frames, rows, columns)
        if "scale_factor_spatial" in vae:  # Wan's video VAE
            factor = vae["scale_factor_spatial"]
        elif "spatial_compression_ratio" in vae:  # HunyuanVideo 1.5's
            factor = vae["spatial_compression_ratio"]
        elif "temperal_downsample" in vae:  # Qwen-Image's video VAE, one frame
            factor = 2 ** len(vae["temperal_downsample"])
        else:  # an AutoencoderKL
            factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return factor * int(patch)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def backbone_class(pipe) -> type[Backbone]:
    """The adapter class for a diffusers pipeline, by its class name; a WanPipeline that ``expand_timesteps`` is
    Wan2.2 TI2V-5B, which also animates a first frame (:class:`WanTI2VBackbone`)."""
    name = type(pipe).__name__
    if name not in BACKBONES:
        raise UserError(
            f"diffalign has no adapter for {name}; supported pipelines: {', '.join(sorted(BACKBONES))}"
        )
    if name in ("WanPipeline", "WanImageToVideoPipeline") and getattr(pipe.config, "expand_timesteps", False):
        return WanTI2VBackbone
    return BACKBONES[name]


def backbone_for(pipe, *, distilled_guidance: float = 3.5, frames: int = 0, expert: str | None = None,
                 prompt_tokens: int | None = None) -> Backbone:
    """The adapter for a diffusers pipeline (:func:`backbone_class`; :class:`Backbone` for the options)."""
    return backbone_class(pipe)(pipe, distilled_guidance=distilled_guidance, frames=frames, expert=expert,
                                prompt_tokens=prompt_tokens)


def check_sources(backbone: Backbone, source_columns: list[str], validation_every: int = 0) -> None:
    """A clear stop before a run trains edits (``data.source_columns``) on a model that reads no source image, or
    fewer than the data gives: it would learn the edits as text-to-image samples, silently. And before a model that
    only edits (:attr:`Backbone.min_sources`) is given no source, or asked for validation images, which are sampled
    from text alone."""
    name = type(backbone.pipe).__name__
    if backbone.min_sources and len(source_columns) < backbone.min_sources:
        raise UserError(f"{name} {backbone.source_role} and cannot sample from text alone: name each row's source "
                        f"image column(s) in data.source_columns (and, online, give online.prompts as such a table)")
    if backbone.min_sources and validation_every:
        raise UserError(f"validation samples images from its prompts alone, and {name} {backbone.source_role}: set "
                        "validation.every=0")
    if len(source_columns) <= backbone.max_sources:
        return
    editors = sorted(name for name, cls in BACKBONES.items() if cls.max_sources)
    reads = f"reads at most {backbone.max_sources}" if backbone.max_sources else "is a text-to-image model and reads none"
    raise UserError(f"data.source_columns gives each prompt {len(source_columns)} source image(s), and "
                    f"{name} {reads}. Edit models: {', '.join(editors)}.")


def configure_denoiser(
    denoiser: nn.Module,
    *,
    attention: str = "sdpa",
    gradient_checkpointing: bool = False,
    channels_last: bool = False,
) -> nn.Module:
    """Attention kernel, gradient checkpointing and memory format of a denoiser.

    ``attention="sdpa"`` keeps diffusers' default processors, which call PyTorch's
    scaled_dot_product_attention (flash / memory-efficient kernels where available);
    ``"xformers"`` switches to xformers' memory-efficient attention (CUDA, optional extra).
    """
    if attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError(
                "attention=xformers needs the xformers package (pip install 'diffalign[xformers]', CUDA only); "
                "the default attention=sdpa needs nothing extra."
            ) from None
        denoiser.enable_xformers_memory_efficient_attention()
    elif attention != "sdpa":
        raise UserError(f"unknown attention {attention!r}; choose 'sdpa' (default) or 'xformers'")
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if channels_last:
        denoiser.to(memory_format=torch.channels_last)
    return denoiser
