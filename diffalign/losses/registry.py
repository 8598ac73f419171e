"""The loss registry: one plain dict from name to :class:`LossSpec`.

A loss is registered with the decorator :func:`register`, which records what family of
inputs it takes (``kind``), a one-line summary and the paper it comes from. Nothing else:
no plugin machinery, no classes to subclass.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args, get_origin

import torch

LossFn = Callable[..., torch.Tensor]

PAIRWISE = "pairwise"
UNPAIRED = "unpaired"
REFERENCE_FREE = "reference-free"
LISTWISE = "listwise"
SOFT_LABEL = "soft-label"
REGULARISER = "regulariser"
DISTILLATION = "distillation"
CLASSIFICATION = "classification"
TOKEN_LEVEL = "token-level"
KINDS = (PAIRWISE, UNPAIRED, REFERENCE_FREE, LISTWISE, SOFT_LABEL, REGULARISER, DISTILLATION, CLASSIFICATION,
         TOKEN_LEVEL)
# the kinds that take logits, not per-example scores (see diffalign.losses.distillation)
LOGIT_KINDS = (DISTILLATION, CLASSIFICATION)
# the per-example inputs a kind's losses all take, which every objective of that kind supplies
KIND_INPUTS = {
    SOFT_LABEL: ("preference",),
    TOKEN_LEVEL: ("chosen_mask", "rejected_mask", "chosen_reward_mask", "rejected_reward_mask", "chosen_kl_mask",
                  "rejected_kl_mask"),
}


@dataclass(frozen=True)
class LossSpec:
    """What the registry knows of one loss.

    Attributes:
        name: registry key, as used in configs (``objective.loss``).
        fn: the pure function computing the per-example loss.
        kind: which call signature it follows (see :mod:`diffalign.losses`).
        summary: one line for ``diffalign losses``.
        paper: short citation with arXiv id and equation number.
        needs_reference: False when the references may be passed as ``None``.
    """

    name: str
    fn: LossFn
    kind: str
    summary: str
    paper: str
    needs_reference: bool = True

    @property
    def options(self) -> dict[str, Any]:
        """The loss's tunable options with their defaults (``objective.loss_options`` in a config).

        These are its keyword-only arguments with a value as default; those without one, or
        with ``None``, are per-example inputs the caller supplies (lengths, scores, soft labels).
        """
        return {
            p.name: p.default for p in inspect.signature(self.fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "beta" and p.default is not p.empty and p.default is not None
        }

    @property
    def inputs(self) -> tuple[str, ...]:
        """The per-example inputs the caller must supply beyond those of its kind (keyword-only arguments without a
        default): SPPO's win-rates, INPO's previous-iterate scores, MADPO's weights. An objective gives them only if
        it estimates them."""
        own = KIND_INPUTS.get(self.kind, ())
        return tuple(p.name for p in inspect.signature(self.fn).parameters.values()
                     if p.kind is p.KEYWORD_ONLY and p.name not in ("beta", *own) and p.default is p.empty)

    @property
    def option_choices(self) -> dict[str, tuple[Any, ...]]:
        """The options whose values are a fixed set (annotated ``Literal[...]``), with that set."""
        parameters = inspect.signature(self.fn, eval_str=True).parameters
        return {name: get_args(parameters[name].annotation) for name in self.options
                if get_origin(parameters[name].annotation) is Literal}


_REGISTRY: dict[str, LossSpec] = {}


def register(
    name: str, *, kind: str, summary: str, paper: str, needs_reference: bool = True
) -> Callable[[LossFn], LossFn]:
    """Decorator adding ``fn`` to the registry under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")

    def decorate(fn: LossFn) -> LossFn:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        _REGISTRY[name] = LossSpec(name, fn, kind, summary, paper, needs_reference)
        return fn

    return decorate


class UnknownLossError(KeyError):
    """Raised by :func:`get` for a name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def spec(name: str) -> LossSpec:
    """The :class:`LossSpec` registered as ``name``; the error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownLossError(
            f"unknown loss {name!r}.{hint} Valid names: {', '.join(sorted(_REGISTRY))}"
        ) from None


def get(name: str) -> LossFn:
    """The loss function registered as ``name``."""
    return spec(name).fn


def names(kind: str | None = None) -> list[str]:
    """Registered names, sorted; only those of ``kind`` when given."""
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def specs() -> list[LossSpec]:
    """Every registered :class:`LossSpec`, sorted by kind then name."""
    return sorted(_REGISTRY.values(), key=lambda s: (KINDS.index(s.kind), s.name))
