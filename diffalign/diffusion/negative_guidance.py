"""Classifier-free guidance with a negative model (Diffusion-NPO, Wang et al. 2025; Self-NPO).

A negative model is trained to be preferred by nobody: fine-tuned on reversed preferences
(Diffusion-NPO) or, without preference data, on the model's own weak outputs (Self-NPO). At
sampling time it replaces (or is mixed into) the unconditional branch of classifier-free guidance,

    eps_u = (1 - mix) * eps_base(x, c_neg) + mix * eps_negative(x, c_neg)
    eps   = eps_u + w * (eps_base(x, c) - eps_u),

so guidance pushes away from what the negative model would draw. ``with_negative_guidance``
does this to a diffusers pipeline by wrapping its denoiser, so the pipeline, its schedulers,
callbacks and options work unchanged. Two kinds of pipeline are covered:

- those that stack [unconditional; conditional] along the batch (SD 1.x/2.x, SDXL, SD3, PixArt):
  the first half of each guided call also runs through the negative model;
- FluxPipeline, whose FLUX.1-dev is guidance-distilled and has no unconditional branch at all: its
  ``guidance_scale`` is an input embedding. diffusers offers "true" classifier-free guidance there
  (``true_cfg_scale`` > 1 with a ``negative_prompt``), a second call per step inside the
  transformer's ``cache_context("uncond")``; that call is the one the negative model joins. Without
  true CFG a FLUX pipeline never calls an unconditional branch, so a negative model changes nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

Tensor = torch.Tensor


def _half(value: Any, batch: int, first: bool) -> Any:
    """The unconditional (first) or conditional half of every tensor with the guided batch size."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[: batch // 2] if first else value[batch // 2:]
    if isinstance(value, dict):
        return {k: _half(v, batch, first) for k, v in value.items()}
    return value


class NegativeGuidedDenoiser(nn.Module):
    """A pipeline's denoiser whose unconditional half also runs through ``negative`` (see the module docstring)."""

    def __init__(self, base: nn.Module, negative: nn.Module, mix: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        self.base, self.negative, self.mix = base, negative, mix
        self.guiding = lambda: True  # set by with_negative_guidance to the pipeline's own flag
        self.context: str | None = None  # the pipeline's cache_context: "uncond" marks FLUX's true-CFG call

    @contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """The base model's cache context, remembering which branch the pipeline is computing."""
        self.context = name
        try:
            with self.base.cache_context(name):
                yield
        finally:
            self.context = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # config, dtype, device, ... are the base model's
            return getattr(super().__getattr__("base"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        if self.mix == 0.0 or self.context == "cond":
            return out
        prediction = _prediction(out)
        if self.context == "uncond":  # a separate unconditional call (FLUX true CFG): the whole batch mixes
            negative = _prediction(self.negative(*args, **kwargs))
            return _like(out, (1 - self.mix) * prediction + self.mix * negative.to(prediction.dtype))
        if not self.guiding():
            return out
        batch = prediction.shape[0]
        negative = _prediction(self.negative(*[_half(a, batch, True) for a in args],
                                             **{k: _half(v, batch, True) for k, v in kwargs.items()}))
        unconditional = (1 - self.mix) * prediction[: batch // 2] + self.mix * negative.to(prediction.dtype)
        return _like(out, torch.cat([unconditional, prediction[batch // 2:]]))


def _prediction(out: Any) -> Tensor:
    """The prediction in a denoiser's output: a tuple's first item or the output's ``sample``."""
    return out[0] if isinstance(out, tuple) else out.sample


def _like(out: Any, prediction: Tensor) -> Any:
    """``prediction`` in the form of the denoiser's output ``out``."""
    return (prediction,) if isinstance(out, tuple) else type(out)(sample=prediction)


def with_negative_guidance(pipe, negative: nn.Module, mix: float = 1.0):
    """``pipe`` with its denoiser wrapped so that guidance uses ``negative``; returns the same pipeline."""
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    wrapper = NegativeGuidedDenoiser(getattr(pipe, name), negative.to(pipe.device), mix)
    wrapper.guiding = lambda: bool(getattr(pipe, "do_classifier_free_guidance", True))
    setattr(pipe, name, wrapper)
    return pipe
