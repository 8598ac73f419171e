"""The typed config of ``diffalign generate-ranked`` (YAML + dotted overrides, validated up front)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from diffalign.errors import UserError


@dataclass
class GeneratorConfig:
    """One image generator: a model and its own sampling settings."""

    # short name used in file names and the summary (letters, digits, - and _)
    name: str
    # a diffusers folder, a diffalign run directory, or a LoRA / denoiser file (then set `base`)
    path: str
    # the base pipeline a LoRA or denoiser file applies to
    base: str | None = None
    steps: int = 30
    guidance_scale: float = 5.0
    # image size; empty = the model's default
    resolution: int | None = None
    # with resolution: images that wide and resolution high (Wan's 832 x 480); empty = square
    width: int | None = None
    # weights dtype: auto (bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16
    dtype: str = "auto"
    # weights variant of the pipeline folder read (path, or base for a LoRA / denoiser file):
    # fp16 reads *.fp16.safetensors, as `hf download ... --include "*fp16*"` leaves a folder
    variant: str | None = None

    @classmethod
    def parse(cls, value: object, index: int) -> GeneratorConfig:
        where = f"generators[{index}]"
        if not isinstance(value, dict) or "name" not in value or "path" not in value:
            raise UserError(f"{where} must be a mapping with at least name and path, got {value!r}")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"{where} has unknown keys {sorted(unknown)}; valid: {', '.join(cls.__dataclass_fields__)}")
        generator = cls(**value)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(generator.name)):
            raise UserError(f"{where}.name {generator.name!r} may hold only letters, digits, - and _")
        if generator.dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise UserError(f"{where}.dtype must be auto, fp32, fp16 or bf16, got {generator.dtype!r}")
        if int(generator.steps) < 1:
            raise UserError(f"{where}.steps must be >= 1")
        return generator


@dataclass
class GenerateConfig:
    # prompts: a .txt file (one per line), .jsonl ({"prompt": ...}), .json list, .tsv/.csv with a Prompt
    # column, a table or cached Hub dataset with :split, or a shipped set (toy_train, general)
    prompts: str = ""
    # the generators, each {name, path, base, steps, guidance_scale, resolution, dtype, variant}
    generators: list = field(default_factory=list)
    # images per prompt from each generator (seeds seed + i*K .. seed + i*K + K-1 for prompt i, the same for all)
    seeds_per_generator: int = 2
    # first seed
    seed: int = 0
    # reward models, as specs (see diffalign.rewards): "pickscore:/models/PickScore_v1", {name: ..., path: ...}
    rewards: list = field(default_factory=list)
    # how reward models are combined into one score per image: rank (Syn-Pic) or zscore, per prompt
    ensemble: str = "rank"
    # pairwise data written next to the lists: best_worst, all (every pair with different scores) or none
    pairs: str = "best_worst"
    # prompts per output shard (a shard is written once all its images are generated and scored)
    shard_size: int = 64
    # images per generation batch, and per reward-scoring batch
    batch_size: int = 16
    # the dataset folder (shard-*.parquet, images/, pairs.jsonl, summary.json)
    output_dir: str = ""
    # edits: prompts is then a table of instructions (caption_column) with each row's source images in these
    # columns, every generator an edit model; the dataset keeps the sources in the same columns
    source_columns: list = field(default_factory=list)
    caption_column: str = "caption"
    # edits: the size the sources are read at (resized and centre-cropped, as training reads them)
    source_resolution: int = 1024
    # video generators (Wan, HunyuanVideo 1.5): every one makes clips of this many frames, saved as lossless animated
    # WebP (a run reads them with data.frames) and scored frame by frame; 0 = images
    frames: int = 0

    def validate(self) -> GenerateConfig:
        from diffalign.rewards import RewardSpec
        from diffalign.rewards.ensemble import METHODS

        if not self.prompts:
            raise UserError("prompts is empty: set it to a prompt file or a shipped set such as toy_train")
        if not self.output_dir:
            raise UserError("output_dir is empty: set the folder the dataset is written to")
        if not self.generators:
            raise UserError("generators is empty: list at least one {name, path} (two or more to rank across models)")
        self.generators = [GeneratorConfig.parse(g, i) if not isinstance(g, GeneratorConfig) else g
                           for i, g in enumerate(self.generators)]
        names = [g.name for g in self.generators]
        if len(set(names)) != len(names):
            raise UserError(f"generator names must be unique, got {names}")
        if not self.rewards:
            raise UserError("rewards is empty: list at least one reward model spec")
        for spec in self.rewards:
            RewardSpec.parse(spec)
        if self.ensemble not in METHODS:
            raise UserError(f"ensemble={self.ensemble!r} is not valid; choose one of {', '.join(METHODS)}")
        if self.pairs not in ("best_worst", "all", "none"):
            raise UserError(f"pairs={self.pairs!r} is not valid; choose best_worst, all or none")
        if self.frames < 0:
            raise UserError(f"frames must be >= 0 (0: images), got {self.frames}")
        for key in ("seeds_per_generator", "shard_size", "batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not isinstance(self.source_columns, list) or not all(isinstance(c, str) and c for c in self.source_columns):
            raise UserError(f"source_columns lists the columns of each row's source images; got {self.source_columns!r}")
        if len(self.generators) * self.seeds_per_generator < 2:
            raise UserError("a ranked list needs at least 2 images per prompt: add a generator or raise seeds_per_generator")
        return self
