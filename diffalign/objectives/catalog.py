"""What ``diffalign methods`` prints: every method with its family, paper and backbones, and one method's options
with their defaults, ranges and documentation, all read from the objective classes and their option dataclasses
(nothing here is written twice)."""

from __future__ import annotations

from diffalign.config import describe
from diffalign.diffusion.backbones import BACKBONES
from diffalign.objectives import OBJECTIVES
from diffalign.objectives.round_reference import PreviousRoundReference

# the families diffalign's diffusion backbones belong to, in the order README's tables use
FAMILY_NAMES = {"sd": "SD1.x/2.x", "sdxl": "SDXL", "sd3": "SD3/3.5", "flux": "FLUX.1",
                "flux-kontext": "FLUX.1 Kontext", "flux2": "FLUX.2 (dev, klein)",
                "zimage": "Z-Image", "qwenimage": "Qwen-Image", "qwenimage-edit": "Qwen-Image-Edit",
                "qwenimage-edit-plus": "Qwen-Image-Edit-2509/2511", "pixart": "PixArt",
                "wan": "Wan2.1/2.2 (video)", "wan-i2v": "Wan2.1/2.2 I2V (video)",
                "hunyuanvideo15": "HunyuanVideo 1.5 (video)",
                "hunyuanvideo15-i2v": "HunyuanVideo 1.5 I2V (video)"}


def method_family(cls: type) -> str:
    """offline, online or self-play (against the previous round's policy), prefixed by "LM" for language models."""
    kind = "self-play" if issubclass(cls, PreviousRoundReference) else "online" if cls.online else "offline"
    return f"LM {kind}" if cls.family == "lm" else kind


def method_backbones(cls: type) -> str:
    if cls.family == "lm":
        return "causal LMs (transformers)"
    families = dict.fromkeys(backbone.family for backbone in BACKBONES.values())
    return ", ".join(FAMILY_NAMES.get(f, f) for f in families)


def methods_table() -> str:
    """One line per method: name, family, paper, backbones."""
    rows = [(name, method_family(cls), cls.paper, method_backbones(cls)) for name, cls in sorted(OBJECTIVES.items())]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{name:<{widths[0]}}  {family:<{widths[1]}}  {paper}; {backbones}" for name, family, paper, backbones in rows]
    return "\n".join(lines + ["", "diffalign methods NAME: a method's options (set as objective.options.KEY=VALUE)"])


def method_page(name: str) -> str:
    """A method's description: its first docstring line, paper, family, backbones, and each option."""
    cls = OBJECTIVES[name]
    summary = (cls.__doc__ or "").strip().split("\n")[0]
    lines = [f"{name}: {summary}", f"  paper: {cls.paper}", f"  family: {method_family(cls)}",
             f"  backbones: {method_backbones(cls)}", ""]
    options = describe(cls.Options)
    if not options:
        lines.append("  no options of its own (the shared objective.* keys and objective.loss_options apply)")
    for key, kind, default, allowed, doc in options:
        allowed = f", allowed {allowed}" if allowed else ""
        lines.append(f"  objective.options.{key} ({kind}, default {default!r}{allowed})")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)
