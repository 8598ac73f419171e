"""Reward models behind one interface (:class:`RewardModel`), looked up by name.

A reward is named by a spec: ``"pickscore:/models/PickScore_v1"``, ``"hps_v2.1:/models/HPS_v2.1.pt"``,
``"aesthetic:/models/aesthetic.pth:clip=/models/ViT-L-14.pt"`` (options as ``key=value`` after
the path), or in YAML ``{name: pickscore, path: ..., processor: ...}``. ``vlm_judge:/models/llava`` asks
a local vision-language model whether the image shows its prompt (VQAScore; options ``question`` and
``answer``). ``image_similarity:/models/clip-vit-large-patch14`` scores an edit by how much of its source image it
keeps (edit rounds only). ``ocr`` is Flow-GRPO's text-rendering reward, read by PP-OCRv4 (``ocr:detect_side=160``
detects text faster on small images). ``geneval:/models/mask2former-swin-small-coco-instance:clip=/models/ViT-L-14.pt``
is GenEval (:mod:`diffalign.rewards.geneval`; ``rule=partial`` for Flow-GRPO's training reward).
On a video model's clips an image reward scores every frame and takes their mean (``frames=min``: their minimum);
``temporal_consistency:/models/clip-vit-large-patch14`` scores how alike neighbouring frames are
(:mod:`diffalign.rewards.video`); ``videoalign:KwaiVGI/VideoReward`` is VideoAlign's VideoReward, which watches the
clip (:mod:`diffalign.rewards.videoalign`).
``openai_judge:http://gpu2:8000/v1:template=unifiedreward`` asks a VLM judge served by vLLM, SGLang or ``transformers
serve`` (:mod:`diffalign.rewards.openai_judge`). A URL (``http://gpu2:8400``) is a reward served by ``diffalign serve-reward``
(:mod:`diffalign.rewards.remote`). The toy rewards and DDPO's JPEG (in)compressibility take no path.
Paths may also name what is in the local Hugging Face cache (``pickscore:yuvalkirstain/PickScore_v1``,
``hps_v2.1:xswu/HPSv2/HPS_v2.1_compressed.pt``; HPSv3 is
``hps_v3:MizzenAI/HPSv3/HPSv3.safetensors:base=Qwen/Qwen2-VL-7B-Instruct``; see :func:`diffalign.paths.find_locally`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from diffalign.errors import UserError
from diffalign.paths import find_locally, how_to_get
from diffalign.rewards.base import RewardModel
from diffalign.rewards.clip_rewards import Aesthetic, ClipScore, HPSv2, ImageSimilarity, PickScore
from diffalign.rewards.compressibility import JpegCompressibility, JpegIncompressibility
from diffalign.rewards.ensemble import ensemble, normalise_per_prompt
from diffalign.rewards.geneval import GenEval
from diffalign.rewards.hpsv3 import HPSv3
from diffalign.rewards.image_reward import ImageReward
from diffalign.rewards.ocr import OcrAccuracy
from diffalign.rewards.openai_judge import OpenAIJudge
from diffalign.rewards.pairwise_judge import PairwiseJudge
from diffalign.rewards.remote import RemoteReward
from diffalign.rewards.toy import ToyAdherence, ToyPreference, ToyPreferenceSoft, ToyVideoAdherence, ToyVideoPreference
from diffalign.rewards.video import TemporalConsistency, frames_reduction
from diffalign.rewards.videoalign import VideoAlign
from diffalign.rewards.vlm_judge import VLMJudge

REWARDS: dict[str, type] = {
    "toy_preference": ToyPreference,
    "toy_adherence": ToyAdherence,
    "toy_preference_soft": ToyPreferenceSoft,
    "toy_video_preference": ToyVideoPreference,
    "toy_video_adherence": ToyVideoAdherence,
    "pickscore": PickScore,
    "hps_v2": HPSv2,
    "hps_v2.1": HPSv2,
    "hps_v3": HPSv3,
    "clip_score": ClipScore,
    "aesthetic": Aesthetic,
    "image_reward": ImageReward,
    "jpeg_compressibility": JpegCompressibility,
    "jpeg_incompressibility": JpegIncompressibility,
    "vlm_judge": VLMJudge,
    "image_similarity": ImageSimilarity,
    "ocr": OcrAccuracy,
    "geneval": GenEval,
    "openai_judge": OpenAIJudge,
    "pairwise_judge": PairwiseJudge,
    "remote": RemoteReward,
    "temporal_consistency": TemporalConsistency,
    "videoalign": VideoAlign,
}
NEEDS_PATH = {"remote", "pickscore", "hps_v2", "hps_v2.1", "hps_v3", "clip_score", "aesthetic", "image_reward",
              "vlm_judge", "image_similarity", "geneval", "openai_judge", "pairwise_judge", "temporal_consistency",
              "videoalign"}
SERVED = {"remote", "openai_judge", "pairwise_judge"}  # their path is a server's URL
PATH_OPTIONS = ("processor", "clip", "tokenizer", "metadata", "base")  # options that name a file or folder


def _local(path: str, what: str) -> str:
    """A path as given when it exists, else what it names in the local Hugging Face cache; neither is an error
    that says how to get it (the ``hf download`` command for a Hub name), before any model is built."""
    found = find_locally(path)
    if found is None:
        raise UserError(f"{what} {path} does not exist, and it names nothing in the local Hugging Face cache. "
                        f"{how_to_get(path)}.")
    return str(found)


@dataclass
class RewardSpec:
    """Which reward model, where its weights are, and its options (device, batch_size, arch, ...)."""

    name: str
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: str | dict | RewardSpec) -> RewardSpec:
        """From ``name[:path[:key=value...]]``, a served reward's URL, or a mapping with ``name``, ``path`` and options
        (``{name: remote, path: URL, timeout: 60}``)."""
        if isinstance(value, str) and value.startswith(("http://", "https://")):  # a served reward
            spec = cls("remote", value)
        elif isinstance(value, RewardSpec):
            spec = value
        elif isinstance(value, dict):
            rest = {k: v for k, v in value.items() if k not in ("name", "path")}
            spec = cls(str(value.get("name", "")), value.get("path"), rest)
        else:
            name, _, tail = str(value).partition(":")
            url = re.match(r"https?://.*?(?=:[A-Za-z_]\w*=|$)", tail)  # a URL path keeps its own colons
            if url:
                path, tail = url.group(0), tail[url.end() + 1:]
            parts = tail.split(":") if tail else []
            if not url:
                path = parts.pop(0) if parts and "=" not in parts[0] else None
            options = dict(p.split("=", 1) for p in parts if "=" in p)
            spec = cls(name, path, options)
        if spec.name not in REWARDS:
            from difflib import get_close_matches

            close = get_close_matches(spec.name, REWARDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown reward model {spec.name!r}{hint}; choose one of {', '.join(REWARDS)}")
        if spec.name in NEEDS_PATH and not spec.path:
            raise UserError(f"reward model {spec.name} needs the path of its weights, e.g. {spec.name}:/models/...")
        return spec


def _check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options the reward ``name`` does not take (its keyword options; for a reward without weights, any
    argument), naming those it does."""
    import inspect

    accepted = [p for p, parameter in inspect.signature(REWARDS[name]).parameters.items()
                if parameter.kind == parameter.KEYWORD_ONLY or name not in NEEDS_PATH]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"its options are {', '.join(accepted)}" if accepted else "it takes no options"
        raise UserError(f"reward {name} has no option {', '.join(unknown)}; {takes}")


def describe(name: str) -> str:
    """The one-sentence description of the reward model registered as ``name`` ("" for none)."""
    from diffalign.rewards.text import TEXT_REWARDS

    if name in TEXT_REWARDS:
        return TEXT_REWARDS[name]().description
    return getattr(REWARDS.get(name), "description", "")


def load_reward(spec: str | dict | RewardSpec) -> RewardModel:
    """The reward model a spec names (see the module docstring), ready to score."""
    spec = RewardSpec.parse(spec)
    options = {k: _local(v, f"reward {spec.name}, option {k}:") if k in PATH_OPTIONS else v
               for k, v in spec.options.items()}
    if "batch_size" in options:
        options["batch_size"] = int(options["batch_size"])
    reads_clips = getattr(REWARDS[spec.name], "reads_clips", False)
    frames_reduce = frames_reduction(options.pop("frames")) if "frames" in options and not reads_clips else "mean"
    _check_options(spec.name, options)
    if spec.name == "remote":  # named by the server: its reward's own name
        model = RemoteReward(spec.path, **options)
        model.frames_reduce = frames_reduce
        return model
    if spec.name not in NEEDS_PATH:
        model = REWARDS[spec.name](**options)
    else:
        path = spec.path if spec.name in SERVED else _local(spec.path, f"reward {spec.name}:")
        model = REWARDS[spec.name](path, **options)
    model.name = spec.name
    model.frames_reduce = frames_reduce  # how it scores a clip by its frames (rewards.video.score_media)
    return model


__all__ = ["REWARDS", "Aesthetic", "ClipScore", "GenEval", "HPSv2", "HPSv3", "ImageReward", "ImageSimilarity", "OcrAccuracy",
           "OpenAIJudge", "PairwiseJudge", "PickScore", "RewardModel", "RewardSpec", "TemporalConsistency", "ToyAdherence", "VideoAlign", "ToyPreference",
           "ToyPreferenceSoft", "VLMJudge", "describe", "ensemble", "load_reward", "normalise_per_prompt"]
